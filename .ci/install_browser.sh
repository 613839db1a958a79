#!/usr/bin/env bash
# What the web demo's tests need (tests/test_demo.py): its Python packages, installed into the project's
# .venv (created with `make setup` first if missing), and Debian's Chromium, which playwright drives (it never
# downloads a browser of its own). Non-interactive and idempotent.
# Usage: bash .ci/install_browser.sh   (DEMO_PYTHON=path/to/python installs into another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${DEMO_PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    make setup
fi
"$PY" -m pip install --quiet -r requirements-demo.txt

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null)"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
echo "installed $(chromium --version 2>/dev/null)"
