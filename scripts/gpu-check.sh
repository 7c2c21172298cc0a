#!/usr/bin/env bash
# The GPU checks, in one run of about 10 minutes on a machine with an NVIDIA GPU, CUDA's
# libraries and PyTorch + transformers + PEFT, and no Rust toolchain. It runs what
# scripts/gpu-bundle.sh built (target/gpu-bundle/, carried along), in the order of what matters
# most, each part under its own time limit, and writes a log per part and summary.txt to $OUT
# (default target/gpu-check):
#   1. kernels:   the CubeCL kernels' golden tests on CUDA (src/ops/cube/tests.rs, f32, 1e-5;
#                 and the bf16 base's products: f32 sums of bf16-rounded inputs);
#   2. gpu-tests: tests/gpu.rs on CUDA: every tiny family vs transformers, `tune eval` and a
#                 6-step `tune run` vs the CPU (f32 base), the bf16 base's run vs the CPU's f32
#                 run (every step within 2%), and the warm start's cache;
#   3. smollm2:   transformers + PEFT (bf16, SDPA) against `tune bench --device cuda` on a random
#                 SmolLM2-135M shape at seq 1024, batch 8, rank 8: tokens/s, peak memory, MFU,
#                 time to the first step on a cold kernel cache; then tune again, warm;
#   4. w2:        the same on a random Llama-3.2-1B shape (W2) at seq 1024, batch 4, rank 16.
#
#   bash scripts/gpu-bundle.sh                     # here, first
#   bash scripts/gpu-check.sh                      # there (device run: carry target/gpu-bundle)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/target/gpu-check}"
mkdir -p "$OUT"
work=$(mktemp -d)
tar -xJf target/gpu-bundle/bundle.tar.xz -C "$work" || { echo "no target/gpu-bundle/bundle.tar.xz: run scripts/gpu-bundle.sh first" | tee "$OUT/summary.txt"; exit 1; }
# shellcheck disable=SC1091
source "$work/paths.env"
# The test binaries find the fixtures under the checkout they were built in, and start the tune
# binary they were built with: both paths are made to exist here.
if [ ! -e "$MANIFEST_BAKED" ]; then
    mkdir -p "$(dirname "$MANIFEST_BAKED")" && ln -s "$PWD" "$MANIFEST_BAKED"
fi
mkdir -p "$(dirname "$TUNE_BIN_BAKED")" && cp "$work/tune" "$TUNE_BIN_BAKED"
export TUNE_CUBECL_CACHE="$work/cubecl"
export PYTHONUNBUFFERED=1
{
    echo "bundle $COMMIT, checkout $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} | tee "$OUT/summary.txt"

part() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name: exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
}

# The parts' limits add up to 510 s; unpacking and writing the two random models take about a
# minute more, so the whole run fits a 10-minute command.
part kernels 100 "$work/lib-tests" --test-threads 1 ops::cube
part gpu-tests 150 "$work/gpu-tests" --include-ignored --test-threads 1 --nocapture
part make-smollm2 30 python3 benches/compare.py --make-random smollm2-135m --model "$work/smollm2"
part smollm2 120 python3 benches/compare.py --model "$work/smollm2" --device cuda --dtype bf16 --seq 1024 --batch 8 --rank 8 --tune "$work/tune"
part smollm2-warm 30 "$work/tune" bench --device cuda --dtype bf16 --model "$work/smollm2" --seq 1024 --batch 8 --rank 8 --steps 6 --json
part make-w2 40 python3 benches/compare.py --make-random llama-1b --model "$work/w2"
[ -d "$work/w2" ] && part w2 90 python3 benches/compare.py --model "$work/w2" --device cuda --dtype bf16 --seq 1024 --batch 4 --rank 16 --tune "$work/tune"
grep -h "^|\|tune / PyTorch" "$OUT"/smollm2.log "$OUT"/w2.log >>"$OUT/summary.txt" 2>/dev/null
echo "== summary"
cat "$OUT/summary.txt"
