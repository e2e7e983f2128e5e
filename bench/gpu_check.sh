#!/usr/bin/env bash
# GPU readiness check, bounded to about 7.5 minutes on one GPU (BUDGET seconds, default 420, for
# the training runs): for the `base` (about GPT-2 small + BERT-base) and `large` (GPT-2 medium +
# BERT-large) models, a few training steps each of the plain PyTorch loop (the baseline), ddp,
# DeepSpeed ZeRO-2 and ZeRO-3, with and without activation checkpointing, then one encoder pass
# for histories and scored items, and the bank of stale negatives; samples/s, tokens/s, MFU and peak memory per run, ratios against the plain loop of
# the same run, and a torch.profiler table of the top kernels of `base`. Runs that do not fit in
# the budget are listed as skipped; a run that fails (out of memory) is listed with its error.
#
# Installs nothing from the network: it runs on the GPU image's own torch, transformers and
# pytorch-lightning; deepspeed (and pydantic/hjson, which it needs) travel as wheels in .whl/,
# made on the CPU machine with:
#   echo /.whl/ >> .git/info/exclude
#   . .venv/bin/activate && pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson==3.1.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# and the run (device tool): carry [".whl"], command `bash bench/gpu_check.sh`, timeout 540 s.
# Figures land in $OUT (one JSON per run, summary.md, profile_base.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${BUDGET:-420}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# SMOKE=1: the same runs on a CPU with the tiny model and a small catalog (checks the script itself)
SMOKE_ARGS=()
[ "${SMOKE:-0}" = 1 ] && SMOKE_ARGS=(--device cpu --scale tiny --batch-size 8 --num-items 500 --negatives 32)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, pytorch_lightning as pl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', pl.__version__)" | tee -a "$OUT/gpu.txt"

start=$SECONDS
run() {  # run NAME ARGS...: one bench/train_throughput.py process, bounded by what is left of the budget
  local name=$1; shift
  local left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 25 ]; then
    echo "{\"run\": \"$name\", \"skipped\": \"time budget spent\"}" > "$OUT/$name.json"
    echo "== $name: skipped (budget)"; return
  fi
  local limit=$(( left < 90 ? left : 90 ))
  echo "== $name ($limit s at most)"
  timeout "$limit" $PY bench/train_throughput.py --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/$name.json" "$@" "${SMOKE_ARGS[@]}" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    local why; why=$(grep -m1 -oE "CUDA out of memory|OutOfMemoryError|[A-Za-z]*Error: .{0,160}" "$OUT/$name.log" | head -1 | tr '"' "'")
    [ $rc -eq 124 ] && why="timed out after $limit s"
    echo "{\"run\": \"$name\", \"failed\": \"${why:-exit $rc}\"}" > "$OUT/$name.json"
  fi
  tail -1 "$OUT/$name.log"
}

run base-plain --scale base --strategy plain --profile "$OUT/profile_base.txt"
run base-ddp --scale base --strategy ddp
run base-zero2 --scale base --strategy deepspeed_stage_2
run base-zero3 --scale base --strategy deepspeed_stage_3
run base-plain-ckpt --scale base --strategy plain --activation-checkpointing
run base-ddp-ckpt --scale base --strategy ddp --activation-checkpointing
run base-zero2-ckpt --scale base --strategy deepspeed_stage_2 --activation-checkpointing
run base-zero3-ckpt --scale base --strategy deepspeed_stage_3 --activation-checkpointing
run large-plain-ckpt --scale large --strategy plain --activation-checkpointing
run large-ddp-ckpt --scale large --strategy ddp --activation-checkpointing
run large-zero2-ckpt --scale large --strategy deepspeed_stage_2 --activation-checkpointing
run large-zero3-ckpt --scale large --strategy deepspeed_stage_3 --activation-checkpointing
run base-plain-shared --scale base --strategy plain --shared-encoding
run base-plain-shared-bank10 --scale base --strategy plain --shared-encoding --bank-refresh-steps 10
run large-zero2-ckpt-shared-bank10 --scale large --strategy deepspeed_stage_2 --activation-checkpointing --shared-encoding --bank-refresh-steps 10
run large-plain --scale large --strategy plain
run large-ddp --scale large --strategy ddp
run large-zero2 --scale large --strategy deepspeed_stage_2
run large-zero3 --scale large --strategy deepspeed_stage_3
run large-zero3-offload-ckpt --scale large --strategy deepspeed_stage_3_offload --activation-checkpointing
run base-plain-compile --scale base --strategy plain --static-width --compile
echo "== training runs took $((SECONDS - start)) s"
$PY bench/gpu_check_summary.py "$OUT" | tee "$OUT/summary.md"
echo "== top kernels of base (plain loop, two steps)"
head -30 "$OUT/profile_base.txt" 2>/dev/null
