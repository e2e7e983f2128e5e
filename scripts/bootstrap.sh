#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment in .venv. Idempotent and quick when nothing changed.
# torch is installed first and pinned: a looser requirement can pull a multi-GB CUDA build.
# deepspeed is an sdist that needs torch at build time, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp_src=$(cat setup.cfg scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.bootstrap-stamp" ] && [ "$(cat "$VENV/.bootstrap-stamp")" = "$stamp_src" ]; then
  exit 0
fi
echo "[bootstrap] creating environment in $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-build-isolation deepspeed==0.19.8
echo "$stamp_src" > "$VENV/.bootstrap-stamp"
echo "[bootstrap] environment ready" >&2
