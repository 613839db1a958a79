"""Regenerate docs/demo.png: serve the demo, enhance a bundled sample in headless Chromium, screenshot the page.

    .venv/bin/python -m docs.demo_screenshot [--sample samples/lol_6.png] [--out docs/demo.png] [--overwrite]

Needs requirements-demo.txt and Chromium (``bash .ci/install_browser.sh``). Uses the bundled checkpoint and
the demo's default sampler, exactly what ``make web-demo`` shows. The browser test of tests/test_demo.py drives
the page with the same pieces (:func:`find_chromium`, :data:`CHROMIUM_ARGS`, :func:`enhance_in_page`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import demo
from models import load_for_inference
from utils.cli import UserError, ensure_output_dir, run_cli
from utils.image_io import atomic_write
from utils.memory import retain_freed_memory_for

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""Headless Chromium as root in a container, with nothing reaching out to the network."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Screenshot the web demo after it enhanced one sample.")
    parser.add_argument("--sample", type=Path, default=ROOT / "samples" / "lol_6.png",
                        help="image to upload (default: samples/lol_6.png)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png", help="PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in px (default 1280)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromium() -> str | None:
    """Path of Debian's Chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def enhance_in_page(page: Any, url: str, image: Path) -> None:
    """Open the demo at ``url`` in a playwright ``page``, upload ``image``, press Enhance and wait until the
    before/after slider shows the result."""
    page.goto(url)
    page.locator("#upload input[type=file]").set_input_files(image)
    page.click("#enhance")
    page.locator("#compare img").first.wait_for()


def screenshot(url: str, sample: Path, width: int) -> bytes:
    """PNG bytes of the whole page once the before/after slider shows ``sample`` enhanced."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise UserError("Chromium not found: bash .ci/install_browser.sh")
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(profile, executable_path=chromium, args=CHROMIUM_ARGS,
                                                        viewport={"width": width, "height": 900})
        try:
            page = browser.new_page()
            page.set_default_timeout(300_000)
            enhance_in_page(page, url, sample)
            page.locator("#anchor img").first.wait_for()
            return page.screenshot(full_page=True)
        finally:
            browser.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.sample.is_file():
        raise UserError(f"sample not found: {args.sample}")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it")
    ensure_output_dir(args.out.parent, "--out")
    model = load_for_inference(None, torch.device("cpu"))
    retain_freed_memory_for(model.device)  # this script owns the process: keep freed memory (CPU)
    app = demo.build_app(model, demo.initial_sampler(model), demo.DEFAULT_MAX_PIXELS,
                         demo.sample_images(demo.SAMPLES_DIR))
    url = demo.launch(app, "127.0.0.1", free_port(), demo.SAMPLES_DIR, block=False)
    try:
        png = screenshot(url, args.sample, args.width)
    finally:
        app.close()
    atomic_write(args.out, lambda tmp: tmp.write_bytes(png))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, (), sys.argv[1:]))
