#!/usr/bin/env python3
"""Dequantize a Llama-architecture GGUF checkpoint into a Hugging Face
`model.safetensors` holding bf16 weights.

    gguf_to_safetensors.py IN.gguf OUT.safetensors

Requires the `numpy` and `gguf` Python packages.

What it does:
  * every GGUF tensor (F32, Q8_0, Q4_1, ...) is dequantized to float32 with
    gguf's reference dequantizer and reshaped to the PyTorch (row-major,
    out_features x in_features) layout -- GGUF lists dimensions innermost first;
  * GGUF names are mapped to the transformers `LlamaForCausalLM` names;
  * llama.cpp's HF->GGUF converter reorders the rows of every q_proj / k_proj
    head (it interleaves the two rotary halves so that its RoPE kernel can work
    on adjacent pairs); that reordering is reverted so the weights work with
    the HF "rotate_half" RoPE convention;
  * values are rounded float32 -> bf16 with round-to-nearest-even;
  * the file is written with tensors in lexicographic name order, a compact
    JSON header padded with spaces to 8 bytes, and `{"format": "pt"}` as
    metadata, so that its bytes (and sha256) are reproducible.

Tensors are streamed one at a time, so peak memory is about one tensor.
"""
import json
import struct
import sys

import numpy as np
from gguf import GGUFReader, dequantize

TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when embeddings are tied
}

PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def scalar_field(reader, key):
    field = reader.fields[key]
    return int(field.parts[field.data[0]][0])


def hf_name(gguf_name):
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in PER_LAYER:
        raise SystemExit(f"gguf_to_safetensors: unexpected tensor {gguf_name!r}")
    _, layer, kind, suffix = parts
    return f"model.layers.{int(layer)}.{PER_LAYER[kind]}.{suffix}"


def unpermute_heads(w, heads):
    """Inverse of llama.cpp's `permute` for q/k projection weights.

    llama.cpp stores head h's rows as (pair p, half j) -> j varies fastest;
    HF stores them as (half j, pair p). Swap the two axes back.
    """
    rows, cols = w.shape
    half = rows // heads // 2
    return (
        w.reshape(heads, half, 2, cols)
        .transpose(0, 2, 1, 3)
        .reshape(rows, cols)
    )


def bf16_bits(w):
    """float32 -> bf16 bit patterns, round to nearest, ties to even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    return ((bits + 0x7FFF + lsb) >> 16).astype(np.uint16)


class Plan:
    """Name, shape and a loader for every output tensor, before any data is read."""

    def __init__(self, reader):
        self.heads = scalar_field(reader, "llama.attention.head_count")
        self.kv_heads = scalar_field(reader, "llama.attention.head_count_kv")
        self.entries = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name in self.entries:
                raise SystemExit(f"gguf_to_safetensors: duplicate tensor {name}")
            shape = tuple(int(d) for d in t.shape.tolist()[::-1])
            self.entries[name] = (shape, t)

    def names(self):
        return sorted(self.entries)

    def load(self, name):
        shape, t = self.entries[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_heads(w, self.heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_heads(w, self.kv_heads)
        return bf16_bits(w)

    def stored(self, name):
        """(safetensors dtype, bytes per element, shape) of a tensor as written."""
        return "BF16", 2, self.entries[name][0]


def write_plan(plan, dst, tag):
    """Writes `plan`'s tensors (its names(), stored(name), load(name)) as one safetensors file:
    a compact JSON header padded with spaces to 8 bytes, `{"format": "pt"}` as metadata, tensors
    in the plan's order, so the bytes (and their pinned sha256) are reproducible."""
    table, offset = {}, 0
    for name in plan.names():
        dtype, width, shape = plan.stored(name)
        size = width * int(np.prod(shape))
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    table["__metadata__"] = {"format": "pt"}
    raw = json.dumps(table, separators=(",", ":")).encode("utf-8")
    header = raw + b" " * (-len(raw) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for name in plan.names():
            out.write(plan.load(name).tobytes())
    print(f"{tag}: wrote {len(plan.entries)} tensors to {dst}", file=sys.stderr)


def convert(src, dst):
    write_plan(Plan(GGUFReader(src)), dst, "gguf_to_safetensors")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(sys.argv[1], sys.argv[2])
