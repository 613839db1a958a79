#!/usr/bin/env bash
# Makes here what bench/gpu_check.py needs on the bare device machine (no network there):
#   .whl/    the wheels of the packages its python3 lacks, lion-pytorch and lpips, at the versions requirements.txt
#            pins (pure Python: pip install --no-index --target installs them there);
#   .lpips/  the AlexNet LPIPS backbone (python -m utils.lpips_weights, `make lpips`, converts it). VGG16's, 59 MB,
#            does not fit in a call's 64 MiB beside the working tree: the check puts a random stand-in in its place.
# Both folders are ignored by git; the device call carries them. Checks that the call's total stays under 64 MiB,
# then prints the device command.
#
#   bash bench/gpu_check_prepare.sh        (PY=python to use another interpreter than .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))

rm -rf .whl .lpips
mkdir -p .whl .lpips
for name in lion-pytorch lpips; do
    pin=$(grep -iE "^${name}==" requirements.txt) || { echo "error: requirements.txt pins no $name" >&2; exit 2; }
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin"
done

alex=$("$PY" -c "from utils.lpips import converted_weights_path; print(converted_weights_path('alex'))")
if [ ! -f "$alex" ]; then
    echo "error: no AlexNet LPIPS backbone at $alex; run \`make lpips\` first" >&2
    exit 2
fi
cp "$alex" .lpips/

# What a call sends: tracked files and untracked ones git does not ignore, plus the carried folders.
tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | sort -zu \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carry=$(find .whl .lpips -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((tree + carry))
awk -v t="$tree" -v c="$carry" 'BEGIN {m = 1048576; printf "working tree %.1f MiB + .whl and .lpips %.1f MiB = \
%.1f MiB of the 64 MiB a call carries\n", t / m, c / m, (t + c) / m}'
if [ "$total" -gt "$LIMIT" ]; then
    largest=$(git ls-files -z | xargs -0 stat -c '%s %n' 2>/dev/null | sort -rn | head -3 \
        | awk '{printf "%s%s (%.1f MiB)", (NR > 1 ? ", " : ""), $2, $1 / 1048576}')
    echo "error: over 64 MiB: the call would be refused; make the working tree smaller (largest: $largest;" \
         "an unfinished run's committed checkpoint can wait outside the repository during the call)" >&2
    exit 2
fi
ls .whl .lpips
"$PY" bench/gpu_check.py --device-command
