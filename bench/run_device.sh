#!/usr/bin/env bash
# One device call: install the carried wheels (diffusers is not in the GPU image), then
# run the whole benchmark (or SCRIPT=bench/turbo_probe.py). Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv | tee "$OUT/nvidia-smi.txt"
SCRIPT=${SCRIPT:-bench/turbo_bench.py}
TORCH_LOGS=recompiles python3 "$SCRIPT" --out "$OUT" "$@" 2>"$OUT/stderr.txt"
rc=$?
grep -v "recompiles\]" "$OUT/stderr.txt" | tail -20
exit $rc
