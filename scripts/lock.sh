#!/usr/bin/env bash
# make lock: regenerates requirements.lock from setup.cfg with uv (every package pinned, with hashes),
# keeping the current pins where setup.cfg still allows them (ARGS=--upgrade to take newer releases,
# ARGS="--upgrade-package NAME" for one). The lock is for CPython 3.11 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
if ! [ -x "$UV" ] && ! command -v "$UV" > /dev/null; then
  echo "lock: no uv at $UV: run make env first (or UV=/path/to/uv make lock)" >&2
  exit 1
fi
# torch's CPU build: from a local folder of wheels where there is one, else PyTorch's CPU index
if [ -n "${TORCH_FIND_LINKS:-}" ]; then torch_source=(--find-links "$TORCH_FIND_LINKS")
elif ls /opt/wheels/torch-*+cpu-*.whl > /dev/null 2>&1; then torch_source=(--find-links /opt/wheels)
else torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
"$UV" pip compile setup.cfg --extra test --extra deepspeed --extra dev \
  --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  "${torch_source[@]}" --custom-compile-command "make lock" -o requirements.lock -q ${ARGS:-}
python3 scripts/lockfile.py stamp
echo "lock: requirements.lock written ($(grep -c '^[a-z0-9].*==' requirements.lock) packages); make env installs it" >&2
