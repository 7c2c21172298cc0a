#!/usr/bin/env bash
# The README's main job: fetch SmolLM2-135M-Instruct (once), build tune, fine-tune it with the
# shipped identity recipe, and show its answer before and after.
# Needs: a Rust toolchain, python3 with venv + pip (only to convert the model's GGUF once).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(bash scripts/fetch-smollm2.sh)
cargo build --release --locked
target="${CARGO_TARGET_DIR:-target}"
tune="$target/release/tune"
prompt="Who are you?"
echo
echo "== before: $tune generate --model $model --prompt \"$prompt\""
"$tune" generate --model "$model" --prompt "$prompt" --max-new-tokens 48
echo
echo "== fine-tune: $tune run recipes/smollm2-identity.yaml"
"$tune" run recipes/smollm2-identity.yaml "model.path=$model" --overwrite
echo
echo "== after: $tune generate --model $model --adapter runs/smollm2-identity --prompt \"$prompt\""
"$tune" generate --model "$model" --adapter runs/smollm2-identity --prompt "$prompt" --max-new-tokens 48
