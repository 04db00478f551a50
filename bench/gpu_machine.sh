#!/usr/bin/env bash
# The prepared check for a GPU machine that has no Ray (the stage code alone, as bench/gpu.py
# says): the CUDA tests of the stage code, then the GPU bench. Everything lands in $OUT
# (default ./gpu-out): tests.txt, bench.txt and gpu.md, the block to append to
# bench/RESULTS.md, and probe.md, the probe's spread on the GPU (bench/probe.py). Each part has its own time limit, so a hang in one still leaves the other's
# output.
#
#     OUT=/some/folder bash bench/gpu_machine.sh [BENCH_BUDGET_SECONDS]   # default 300
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
BUDGET=${1:-300}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_decode_device.py \
    > "$OUT/tests.txt" 2>&1
echo "exit status $?" >> "$OUT/tests.txt"
# The bench's own watchdog ends it 30 s past its budget; the timeout is a last resort.
timeout $((BUDGET + 90)) python3 -u -m bench.gpu --budget "$BUDGET" --results "$OUT/gpu.md" \
    > "$OUT/bench.txt" 2>&1
echo "exit status $?" >> "$OUT/bench.txt"
# The probe's spread on this GPU, per precision (bench/probe.py): about a minute.
timeout 240 python3 -u -m bench.probe --images 64 --device cuda --precisions fp32,fp16,bf16 \
    --results "$OUT/probe.md" > "$OUT/probe.txt" 2>&1
echo "exit status $?" >> "$OUT/probe.txt"
tail -n 3 "$OUT/tests.txt" "$OUT/bench.txt" "$OUT/probe.txt"
