#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has CUDA and PyTorch but no Rust
# toolchain: the `tune` binary and the two test binaries with GPU tests (the CubeCL kernels'
# golden tests in the library, and tests/gpu.rs), all with `--features cuda` alone, stripped and
# packed into target/gpu-bundle/ (about 16 MB, xz -9). The test binaries keep the paths they were built
# with (the checkout, for the fixtures, and the tune binary they start), so those go in the
# bundle too, and gpu-check.sh recreates them there.
#
#   bash scripts/gpu-bundle.sh        # here, about 8 minutes on 2 cores with the deps cached
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tune/cargo-target}"
out=target/gpu-bundle
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

cargo build --release --locked --features cuda
# Compiler messages go to stderr (shown); the artifacts' JSON lines to stdout.
json=$(cargo test --release --locked --features cuda --no-run --lib --test gpu --message-format=json)
exe() {
    # The executable of the test target named $1 ("lib" for the library's unit tests).
    echo "$json" | python3 -c '
import json, sys
kind = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        if (kind == "lib" and "lib" in t["kind"]) or (kind != "lib" and t["name"] == kind):
            print(m["executable"])
' "$1"
}
lib=$(exe lib)
gpu=$(exe gpu)
[ -n "$lib" ] && [ -n "$gpu" ] || { echo "gpu-bundle: no test executables found" >&2; exit 1; }
cp "$CARGO_TARGET_DIR/release/tune" "$stage/tune"
cp "$lib" "$stage/lib-tests"
cp "$gpu" "$stage/gpu-tests"
strip "$stage/tune" "$stage/lib-tests" "$stage/gpu-tests"
{
    echo "MANIFEST_BAKED=$PWD"
    echo "TUNE_BIN_BAKED=$CARGO_TARGET_DIR/release/tune"
    echo "COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty)"
} >"$stage/paths.env"
mkdir -p "$out"
tar -cf - -C "$stage" . | xz -9 -T0 >"$out/bundle.tar.xz.tmp"
mv "$out/bundle.tar.xz.tmp" "$out/bundle.tar.xz"
echo "gpu-bundle: $out/bundle.tar.xz ($(du -h "$out/bundle.tar.xz" | cut -f1)) from $(grep COMMIT "$stage/paths.env")"
