#!/usr/bin/env bash
# The test command of the README and of CI: fetches the real SmolLM2-135M-Instruct and Gemma 3
# 270M (once; cached), runs every test in release mode — the ones that need those models are
# #[ignore]d in a plain `cargo test`, so they run here with --include-ignored and fail if a
# model is missing —, with the wgpu backend built in and its tests run on lavapipe (Mesa's
# Vulkan on the CPU; installed here with apt-get when no Vulkan driver is present and this is
# root), checks clippy, and checks that the CUDA build compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tune/cargo-target}"
TUNE_SMOLLM2="${TUNE_SMOLLM2:-$(bash scripts/fetch-smollm2.sh)}"
TUNE_GEMMA3="${TUNE_GEMMA3:-$(bash scripts/fetch-gemma3.sh)}"
export TUNE_SMOLLM2 TUNE_GEMMA3
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 && ! ls /etc/vulkan/icd.d/*.json >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing lavapipe (mesa-vulkan-drivers libvulkan1) for the wgpu tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null; }
    else
        echo "== no Vulkan driver found: the wgpu tests will fail (install mesa-vulkan-drivers libvulkan1)"
    fi
fi
echo "== tests (SmolLM2 at $TUNE_SMOLLM2, Gemma 3 at $TUNE_GEMMA3; wgpu on $(ls /usr/share/vulkan/icd.d/ 2>/dev/null | tr '\n' ' '))"
cargo test --release --locked --features wgpu --no-fail-fast -- --include-ignored
echo "== clippy"
cargo clippy --release --locked --all-targets --features wgpu -- -D warnings
echo "== cuda build (compile only; no GPU needed)"
cargo build --release --locked --features cuda
