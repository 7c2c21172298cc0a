#!/usr/bin/env python3
"""Writes a random-weight checkpoint of a large model's shape, for `tune bench` (the 7B rows).

  /work/venv/bin/python scripts/make-random-model.py mistral-7b /tmp/mistral-7b-random
  tune bench --model /tmp/mistral-7b-random --dtype bf16 --activation-checkpointing --seq 256 --batch 1 --steps 1

bf16 safetensors shards of at most 5 GB with their index, as `save_pretrained` writes them, and
a config.json. Tensors are drawn and written a slab of rows at a time, so the script needs a few
hundred MB whatever the model's size (transformers' `from_config` would build the whole model
in f32 first: 29 GB for 7B). Weights are N(0, 0.02) as the models' initializer_range, norms 1.
Needs numpy only.
"""
import json, os, struct, sys
from pathlib import Path

import numpy as np

SHAPES = {
    # Mistral-7B-v0.3: the seeds' example model
    "mistral-7b": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                       tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=32768,
                       rms_norm_eps=1e-5, sliding_window=None, head_dim=128),
    # Llama-3.1-8B
    "llama-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                     head_dim=128),
    # a small one of the same layout, to try the script in seconds
    "mistral-tiny": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=256, intermediate_size=896,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                         tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, sliding_window=None, head_dim=32),
}
SHARD_BYTES = 5_000_000_000
SLAB = 1 << 24  # elements drawn at once


def tensors(c):
    """(name, shape, kind) in the order save_pretrained writes a Llama-shaped model."""
    h, f, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (c["vocab_size"], h), "normal"
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), "ones"
        yield p + "self_attn.q_proj.weight", (q, h), "normal"
        yield p + "self_attn.k_proj.weight", (kv, h), "normal"
        yield p + "self_attn.v_proj.weight", (kv, h), "normal"
        yield p + "self_attn.o_proj.weight", (h, q), "normal"
        yield p + "post_attention_layernorm.weight", (h,), "ones"
        yield p + "mlp.gate_proj.weight", (f, h), "normal"
        yield p + "mlp.up_proj.weight", (f, h), "normal"
        yield p + "mlp.down_proj.weight", (h, f), "normal"
    yield "model.norm.weight", (h,), "ones"
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (c["vocab_size"], h), "normal"


def bf16_bits(x):
    """f32 -> bf16 bit patterns, rounded to nearest even (no NaNs here)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_shard(path, entries, rng):
    header, offset = {}, 0
    for name, shape, _ in entries:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for _, shape, kind in entries:
            left = int(np.prod(shape))
            while left:
                n = min(SLAB, left)
                x = np.ones(n, np.float32) if kind == "ones" else rng.standard_normal(n, dtype=np.float32) * 0.02
                out.write(bf16_bits(x).tobytes())
                left -= n
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: make-random-model.py {{{'|'.join(SHAPES)}}} OUT_DIR")
    c, out = dict(SHAPES[sys.argv[1]]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], [], 0
    for t in tensors(c):
        n = 2 * int(np.prod(t[1]))
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / name, entries, rng)
        for e in entries:
            weight_map[e[0]] = name
            total += 2 * int(np.prod(e[1]))
        print(f"wrote {out / name}", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = dict(c, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, hidden_act="silu", attention_dropout=0.0,
                  initializer_range=0.02, attention_bias=False, mlp_bias=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{sys.argv[1]}: {total / 1e9:.1f} GB in {len(shards)} shards at {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
