#!/usr/bin/env bash
# GPU readiness check: trains the `base` model (about GPT-2 small + BERT-base) for a bounded
# number of steps on one GPU with ddp and with DeepSpeed ZeRO-2, printing samples/s, tokens/s,
# peak memory and MFU. Installs nothing from the network: it runs on the GPU image's own torch,
# transformers and pytorch-lightning; deepspeed (and pydantic/hjson, which it needs) travel as
# wheels in .whl/, made on the CPU machine with:
#   echo /.whl/ >> .git/info/exclude
#   . .venv/bin/activate && pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson==3.1.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# and the run (device tool): carry [".whl"], command `bash bench/gpu_check.sh`, timeout about 480 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, pytorch_lightning as pl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', pl.__version__)" | tee -a "$OUT/gpu.txt"
STEPS=${STEPS:-30}
status=0
for strategy in ddp deepspeed_stage_2; do
  echo "== base model, $strategy, $STEPS timed steps"
  timeout 200 $PY bench/train_throughput.py --scale base --strategy "$strategy" --steps "$STEPS" --json "$OUT/$strategy.json" 2>&1 | tail -3 || status=1
done
exit $status
