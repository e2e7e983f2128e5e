#!/usr/bin/env bash
# make env: creates (or refreshes) the virtual environment in .venv with exactly requirements.lock
# (every package pinned with its hashes; generated from setup.cfg by make lock). Idempotent, and
# instant when neither the lock, setup.cfg nor this script changed.
# Order: uv (the installer, from the lock); torch alone first (a looser requirement can pull a
# multi-GB CUDA build); then the whole lock, exactly (what it does not list is removed), deepspeed (an sdist that needs torch at
# build time) built without build isolation; then this project, editable, without dependencies.
# Every installed module is compiled to bytecode at install time (--compile-bytecode): with
# PYTHONDONTWRITEBYTECODE set, as on our machines, Python otherwise compiles torch, Lightning,
# transformers and Ray from source in every process it starts (every job, test subprocess and Ray
# worker), and `import jobs.pipeline` takes 29 s instead of 12 s (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=requirements.lock
stamp_src=$(cat "$LOCK" setup.cfg scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.bootstrap-stamp" ] && [ "$(cat "$VENV/.bootstrap-stamp")" = "$stamp_src" ]; then
  exit 0
fi
echo "[bootstrap] creating environment in $VENV from $LOCK" >&2
start=$SECONDS
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" scripts/lockfile.py entry uv > "$tmp/uv.txt"
"$py" -m pip install -q --no-deps --require-hashes -r "$tmp/uv.txt"
uv="$VENV/bin/uv"
# torch's CPU build: from a local folder of wheels where there is one, else PyTorch's CPU index
if [ -n "${TORCH_FIND_LINKS:-}" ]; then torch_source=(--find-links "$TORCH_FIND_LINKS")
elif ls /opt/wheels/torch-*+cpu-*.whl > /dev/null 2>&1; then torch_source=(--find-links /opt/wheels)
else torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
"$PYTHON" scripts/lockfile.py entry torch > "$tmp/torch.txt"
"$uv" pip install -q --python "$py" --compile-bytecode --no-deps --require-hashes "${torch_source[@]}" -r "$tmp/torch.txt"
"$uv" pip install -q --python "$py" --compile-bytecode --exact --require-hashes --no-build-isolation-package deepspeed "${torch_source[@]}" -r "$LOCK"
"$uv" pip install -q --python "$py" --no-deps --no-build-isolation -e .
if ! "$py" scripts/lockfile.py check; then
  echo "[bootstrap] warning: $LOCK does not match setup.cfg (above); installed the lock as it is. Run make lock." >&2
fi
echo "$stamp_src" > "$VENV/.bootstrap-stamp"
echo "[bootstrap] environment ready ($((SECONDS - start)) s)" >&2
