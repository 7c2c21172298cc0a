#!/usr/bin/env bash
# fetch-llama-cpp.sh [DEST]
#
# Builds a real llama.cpp to test tune's GGUF exports against, from the source that the PyPI
# sdist llama-cpp-python==0.3.36 vendors under vendor/llama.cpp (pinned by sha256). No git, no
# hub: pip fetches the sdist and the cmake/ninja wheels from PyPI.
#
# DEST defaults to ${TUNE_LLAMA_CPP:-$HOME/.cache/tune/llama.cpp}. It ends up holding
#     src/      the vendored llama.cpp (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py)
#     bin/      llama-completion  llama-quantize  llama-perplexity
#     .complete
# The absolute DEST is the only thing printed on stdout; progress goes to stderr. A finished
# DEST is left alone, so a second call returns at once. The build happens in DEST.tmp-XXXXXX,
# renamed into place at the end: an interrupted build never leaves a half-built DEST.
set -euo pipefail

SDIST=llama_cpp_python-0.3.36.tar.gz
SDIST_REQ=llama-cpp-python==0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TARGETS=(llama-completion llama-quantize llama-perplexity)
# A fixed instruction set rather than -march=native: on Intel Xeons with AMX, the native build
# takes ggml's AMX kernels, which crash (a general protection fault) on multi-token prompts
# with a q8_0 model in the VMs seen here. AVX-512 where the CPU has it, else AVX2.
CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    CPU_FLAGS+=(-DGGML_AVX512=ON)
fi
STAMP="$SDIST_SHA256 ${TARGETS[*]} ${CPU_FLAGS[*]}"

say() { echo "fetch-llama-cpp: $*" >&2; }
die() { say "error: $*"; exit 1; }

dest=$(realpath -m "${1:-${TUNE_LLAMA_CPP:-$HOME/.cache/tune/llama.cpp}}")
complete() { [ "$(cat "$1/.complete" 2>/dev/null)" = "$STAMP" ]; }
if complete "$dest"; then
    echo "$dest"
    exit 0
fi
command -v python3 >/dev/null || die "python3 not found"
mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
flock 9
if complete "$dest"; then
    echo "$dest"
    exit 0
fi
for stale in "$dest".tmp-??????; do
    [ -d "$stale" ] && { say "removing stale $stale"; rm -rf "$stale"; }
done

start=$SECONDS
staging=$(mktemp -d "$dest.tmp-XXXXXX")
trap 'rm -rf "$staging"' EXIT
trap 'exit 130' INT TERM

say "build tools (cmake, ninja) from PyPI"
python3 -m venv "$staging/.venv" >&2 || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
"$staging/.venv/bin/python" -m pip install -q --disable-pip-version-check --no-input cmake ninja >&2 \
    || die "pip install cmake ninja failed"

say "downloading $SDIST_REQ (source only)"
"$staging/.venv/bin/python" -m pip download -q --disable-pip-version-check --no-input --no-deps \
    --no-binary llama-cpp-python "$SDIST_REQ" -d "$staging/dl" >&2 || die "pip download $SDIST_REQ failed"
echo "$SDIST_SHA256  $staging/dl/$SDIST" | sha256sum -c --quiet - >&2 || die "$SDIST: sha256 mismatch"
tar xzf "$staging/dl/$SDIST" -C "$staging/dl"
mv "$staging/dl/${SDIST%.tar.gz}/vendor/llama.cpp" "$staging/src"
rm -rf "$staging/dl"

say "building ${TARGETS[*]} (a few minutes on 2 cores)"
PATH="$staging/.venv/bin:$PATH"
cmake -S "$staging/src" -B "$staging/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    "${CPU_FLAGS[@]}" -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2 \
    || die "cmake configure failed"
cmake --build "$staging/build" -j "$(nproc)" --target "${TARGETS[@]}" >&2 || die "build failed"
mkdir -p "$staging/bin"
for t in "${TARGETS[@]}"; do
    cp "$staging/build/bin/$t" "$staging/bin/"
done
# Static binaries: nothing in the build tree (or the build venv, whose paths a rename would
# break) is needed any more.
rm -rf "$staging/build" "$staging/.venv"

printf '%s' "$STAMP" > "$staging/.complete"
rm -rf "$dest"
mv "$staging" "$dest"
trap - EXIT
say "done in $((SECONDS - start)) s: $dest"
echo "$dest"
