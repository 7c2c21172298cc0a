#!/usr/bin/env bash
# The test command of the README and of CI: fetches the real SmolLM2-135M-Instruct (once; cached),
# runs every test in release mode, checks clippy, and checks that the CUDA build compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tune/cargo-target}"
TUNE_SMOLLM2="${TUNE_SMOLLM2:-$(bash scripts/fetch-smollm2.sh)}"
export TUNE_SMOLLM2
export TUNE_REQUIRE_SMOLLM2=1
echo "== tests (SmolLM2 at $TUNE_SMOLLM2)"
cargo test --release --locked --no-fail-fast
echo "== clippy"
cargo clippy --release --locked --all-targets -- -D warnings
echo "== cuda build (compile only; no GPU needed)"
cargo build --release --locked --features cuda
