#!/usr/bin/env bash
# The test command of the README and of CI: fetches the real SmolLM2-135M-Instruct and Gemma 3
# 270M (once; cached), runs every test in release mode — the ones that need those models are
# #[ignore]d in a plain `cargo test`, so they run here with --include-ignored and fail if a
# model is missing —, checks clippy, and checks that the CUDA build compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tune/cargo-target}"
TUNE_SMOLLM2="${TUNE_SMOLLM2:-$(bash scripts/fetch-smollm2.sh)}"
TUNE_GEMMA3="${TUNE_GEMMA3:-$(bash scripts/fetch-gemma3.sh)}"
export TUNE_SMOLLM2 TUNE_GEMMA3
echo "== tests (SmolLM2 at $TUNE_SMOLLM2, Gemma 3 at $TUNE_GEMMA3)"
cargo test --release --locked --no-fail-fast -- --include-ignored
echo "== clippy"
cargo clippy --release --locked --all-targets -- -D warnings
echo "== cuda build (compile only; no GPU needed)"
cargo build --release --locked --features cuda
