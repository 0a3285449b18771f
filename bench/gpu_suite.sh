#!/usr/bin/env bash
# The GPU bench suite: one command, one table, under 8 minutes on one H100/H200.
#
#     bash bench/gpu_suite.sh [LOG]           # LOG: where the JSON lines go (default: a temporary file)
#
# Rows: the sharded train step of CONFIG (default configs/diffusion/cifar10_ddpmpp_cond.py) in bfloat16 and float32 at
# batch 128 and 512 (bench/train_throughput.py), then sampling throughput with EDM's Heun sampler, 18 steps
# (35 network evaluations per image), unguided and with classifier-free guidance w=2, batched (one call on the doubled
# batch) and in two calls (bench/sample_throughput.py).
# A failing row is reported and skipped. Each row runs in its own process, so memory starts empty; the rows share
# one persistent compilation cache, fresh per suite run (JAX_COMPILATION_CACHE_DIR), so a program two rows compile
# alike (the params' init at one dtype) is compiled once, while every timed program is still compiled in its row.
# Then DiT-XL/2's forward and forward+backward on ImageNet-256 latents (bench/net_step.py, batch 256, bf16).
# Each row's JSON gets its wall seconds (row_s), the table the suite's total. The environment variables CONFIG,
# TRAIN_BATCHES, TRAIN_DTYPES, SAMPLE_BATCH and STEPS shrink the suite for a CPU smoke test; SKIP_DIT=1 drops the
# DiT row.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/diffusion/cifar10_ddpmpp_cond.py}
TRAIN_BATCHES=${TRAIN_BATCHES:-128 512}
TRAIN_DTYPES=${TRAIN_DTYPES:-bfloat16 float32}
SAMPLE_BATCH=${SAMPLE_BATCH:-512}
STEPS=${STEPS:-20}
LOG=${1:-$(mktemp)}
: > "$LOG"
PY=${PYTHON:-python3}
export PYTHONPATH="bench:.${PYTHONPATH:+:$PYTHONPATH}"
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
export JAX_COMPILATION_CACHE_DIR="$CACHE" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

# row NAME CMD...: runs one row, appends its last JSON line with "bench": NAME and "row_s" to LOG.
row() {
  local name=$1 begin=$SECONDS json
  shift
  json=$("$@" | tee /dev/stderr | grep '^{' | tail -n 1) || { echo "row failed: $name $*" >&2; return 0; }
  [ -n "$json" ] || { echo "row failed: $name $* (no JSON line)" >&2; return 0; }
  echo "$json" | sed "s/^{/{\"bench\": \"$name\", \"row_s\": $((SECONDS - begin)), /" >> "$LOG"
}

for dtype in $TRAIN_DTYPES; do
  for batch in $TRAIN_BATCHES; do
    echo "train step: $CONFIG batch $batch $dtype" >&2
    row train $PY bench/train_throughput.py --config "$CONFIG" --batch "$batch" --dtype "$dtype" --steps "$STEPS"
  done
done
if [ -z "${SKIP_DIT:-}" ]; then
  echo "network step: DiT-XL/2 on 32x32x4 latents, batch 256, bfloat16" >&2
  row net $PY bench/net_step.py --net dit_xl2_256 --batch 256 --dtype bfloat16 --steps 10
fi
for guidance in none 2 "cfg:weight=2,batched=False"; do
  flag=(); [ "$guidance" = none ] || flag=(--guidance "$guidance")
  echo "sampling: $CONFIG edm 18 steps, batch $SAMPLE_BATCH, guidance $guidance" >&2
  row sample $PY bench/sample_throughput.py --config "$CONFIG" --solver edm --num_steps 18 --batch "$SAMPLE_BATCH" \
    --batches 3 --dtype bfloat16 "${flag[@]}"
done
$PY bench/suite_table.py "$LOG"
echo "suite: $SECONDS s"
