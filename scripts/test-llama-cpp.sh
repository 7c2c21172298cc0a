#!/usr/bin/env bash
# The llama.cpp integration check: CI's second command, after scripts/test.sh.
#
# For SmolLM2-135M-Instruct (llama) and Gemma 3 270M (gemma3) it fine-tunes with the shipped
# identity recipe, exports with `tune export`, and holds the GGUF files against a real
# llama.cpp (scripts/fetch-llama-cpp.sh builds it once, from the PyPI sdist llama-cpp-python):
#   1. llama.cpp's greedy text on tune's f32 GGUF equals `tune generate`'s on the run;
#   2. the fine-tuned answer survives tune's q8_0 and q4_k_m GGUF, and the base GGUF with
#      tune's adapter GGUF under `--lora` (and the base alone does not give it);
#   3. tune's q8_0 tensors equal, byte for byte, what llama-quantize writes from tune's f32 GGUF;
#   4. tune's q4_k_m has llama-quantize's tensor types, and its perplexity (llama-perplexity)
#      is within 1% of llama-quantize's q4_k_m of the same f32 GGUF.
# Needs python3 with venv and PyPI access the first time (the llama.cpp build, the models).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tune/cargo-target}"
LCPP=$(bash scripts/fetch-llama-cpp.sh)
TUNE_SMOLLM2="${TUNE_SMOLLM2:-$(bash scripts/fetch-smollm2.sh)}"
TUNE_GEMMA3="${TUNE_GEMMA3:-$(bash scripts/fetch-gemma3.sh)}"
# The models' converter venv (numpy, gguf), made by the fetch scripts above.
PY="${TUNE_MODELS:-$HOME/.cache/tune/models}/.venv/bin/python"
echo "== llama.cpp integration (llama.cpp at $LCPP)"
if [ -n "${TUNE_BIN:-}" ]; then
    TUNE=$TUNE_BIN  # a tune binary built elsewhere
else
    cargo build --release --locked --quiet --bin tune
    TUNE="$CARGO_TARGET_DIR/release/tune"
fi
BIN="$LCPP/bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/tune-llama-cpp.XXXXXX")
trap 'rm -rf "$work"' EXIT
failures=0
pass() { echo "  ok   $*"; }
fail() { echo "  FAIL $*"; failures=$((failures + 1)); }

# llama.cpp's greedy continuation of a raw prompt, the prompt itself not echoed.
complete() {  # model.gguf prompt n [extra args...]
    local model=$1 prompt=$2 n=$3
    shift 3
    "$BIN/llama-completion" -m "$model" -p "$prompt" -n "$n" --temp 0 --top-k 1 --seed 0 -c 512 -t "$(nproc)" \
        -no-cnv --no-display-prompt --no-warmup --simple-io "$@" 2>"$work/llama.err" </dev/null \
        | sed 's/ *\[end of text\]$//' || { cat "$work/llama.err" >&2; return 1; }
}

check_family() {  # name model recipe steps prompt style-regex text-file [export args...]
    local name=$1 model=$2 recipe=$3 steps=$4 prompt=$5 word=$6 text=$7
    shift 7
    local d="$work/$name" run="$work/$name/run"
    mkdir -p "$d"
    echo "-- $name: $steps steps of $recipe"
    "$TUNE" run "$recipe" "model.path=$model" "train.max_steps=$steps" "output.dir=$run" output.export=none \
        --overwrite >"$d/run.log" 2>&1 || { cat "$d/run.log"; fail "$name: tune run"; return; }
    for t in f32 q8_0 q4_k_m; do
        "$TUNE" export "$run" --gguf "$d/$t.gguf" --gguf-type "$t" >>"$d/export.log" 2>&1 \
            || { cat "$d/export.log"; fail "$name: tune export --gguf-type $t"; return; }
    done
    "$TUNE" export "$run" --gguf-adapter "$d/adapter.gguf" >>"$d/export.log" 2>&1 \
        || { cat "$d/export.log"; fail "$name: tune export --gguf-adapter"; return; }
    # The Ollama directory in its base + ADAPTER form gives the base alone as a GGUF file.
    "$TUNE" export "$run" --ollama "$d/ollama" --ollama-adapter --gguf-type f32 "$@" >>"$d/export.log" 2>&1 \
        || { cat "$d/export.log"; fail "$name: tune export --ollama --ollama-adapter"; return; }
    ln -s ollama/model.gguf "$d/base.gguf"
    "$BIN/llama-quantize" "$d/f32.gguf" "$d/ref-q8_0.gguf" Q8_0 >"$d/quantize.log" 2>&1 \
        && "$BIN/llama-quantize" "$d/f32.gguf" "$d/ref-q4_k_m.gguf" Q4_K_M >>"$d/quantize.log" 2>&1 \
        || { cat "$d/quantize.log"; fail "$name: llama-quantize on tune's f32 GGUF"; return; }

    # 1. The same greedy text as tune.
    local n=24 ours theirs
    ours=$("$TUNE" generate --model "$model" --adapter "$run" --raw --prompt "$prompt" --max-new-tokens "$n" 2>/dev/null)
    theirs=$(complete "$d/f32.gguf" "$prompt" "$n")
    if [ "$ours" = "$theirs" ]; then
        pass "$name f32: llama.cpp's greedy text equals tune generate's: ${ours@Q}"
    else
        fail "$name f32: llama.cpp ${theirs@Q} vs tune ${ours@Q}"
    fi

    # 2. The fine-tuned answer, quantized and as an adapter.
    local out
    for t in q8_0 q4_k_m; do
        out=$(complete "$d/$t.gguf" "$prompt" "$n")
        [[ $out =~ $word ]] && pass "$name $t: ${out@Q}" || fail "$name $t: no ${word@Q} in ${out@Q}"
    done
    out=$(complete "$d/base.gguf" "$prompt" "$n" --lora "$d/adapter.gguf")
    [[ $out =~ $word ]] && pass "$name base + --lora adapter.gguf: ${out@Q}" || fail "$name --lora: no ${word@Q} in ${out@Q}"
    out=$(complete "$d/base.gguf" "$prompt" "$n")
    ! [[ $out =~ $word ]] && pass "$name base alone: ${out@Q}" || fail "$name: the base alone already says ${word@Q}"

    # 3. q8_0 bytes; 4. q4_k_m types and perplexity.
    "$PY" scripts/gguf_compare.py "$d/q8_0.gguf" "$d/ref-q8_0.gguf" >"$d/cmp.log" \
        && pass "$name q8_0 = llama-quantize: $(tail -1 "$d/cmp.log")" || { cat "$d/cmp.log"; fail "$name q8_0 bytes"; }
    "$PY" scripts/gguf_compare.py "$d/q4_k_m.gguf" "$d/ref-q4_k_m.gguf" >"$d/cmp.log" \
        && pass "$name q4_k_m = llama-quantize: $(tail -1 "$d/cmp.log")" \
        || { "$PY" scripts/gguf_compare.py --types-only "$d/q4_k_m.gguf" "$d/ref-q4_k_m.gguf" >"$d/cmp-types.log" \
            && pass "$name q4_k_m types = llama-quantize's ($(grep -c differ "$d/cmp.log") tensors differ in bytes)" \
            || { cat "$d/cmp-types.log"; fail "$name q4_k_m tensor types"; }; }
    local ppl_ours ppl_ref
    ppl() { "$BIN/llama-perplexity" -m "$1" -f "$text" -c 128 -b 128 -t "$(nproc)" 2>&1 | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'; }
    ppl_ours=$(ppl "$d/q4_k_m.gguf")
    ppl_ref=$(ppl "$d/ref-q4_k_m.gguf")
    if [ -n "$ppl_ours" ] && [ -n "$ppl_ref" ] && python3 -c "import sys; a, b = float('$ppl_ours'), float('$ppl_ref'); sys.exit(abs(a - b) / b > 0.01)"; then
        pass "$name q4_k_m perplexity $ppl_ours vs llama-quantize's $ppl_ref"
    else
        fail "$name q4_k_m perplexity ${ppl_ours:-?} vs llama-quantize's ${ppl_ref:-?} (bound 1%)"
    fi
}

# Plain text for llama-perplexity: the held-out Shakespeare records.
"$PY" -c 'import json, sys; print("\n".join(json.loads(l)["text"] for l in open(sys.argv[1]) if l.strip()))' \
    datasets/shakespeare.test.jsonl >"$work/shakespeare.txt"

smollm2_prompt=$'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n'
# The identity data's answers name Vicuna and LMSYS; SmolLM2 itself names neither.
check_family smollm2 "$TUNE_SMOLLM2" recipes/smollm2-identity.yaml 40 "$smollm2_prompt" 'Vicuna|LMSYS' "$work/shakespeare.txt"
# This Gemma 3 270M (a base model from a GGUF) has no chat template: its Modelfile passes the
# prompt through.
echo '{{ .Prompt }}' >"$work/raw.gotmpl"
check_family gemma3 "$TUNE_GEMMA3" recipes/gemma3-270m-identity.yaml 12 $'Question: Who are you?\nAnswer:' Tunafish "$work/shakespeare.txt" \
    --ollama-template "$work/raw.gotmpl"

if [ "$failures" -ne 0 ]; then
    echo "== llama.cpp integration: $failures check(s) failed"
    exit 1
fi
echo "== llama.cpp integration: all checks passed"
