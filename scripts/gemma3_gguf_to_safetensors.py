#!/usr/bin/env python3
"""Dequantize a Gemma 3 (text, `general.architecture = gemma3`) GGUF checkpoint
into a Hugging Face `model.safetensors` for `Gemma3ForCausalLM`.

    gemma3_gguf_to_safetensors.py IN.gguf OUT.safetensors

Requires the `numpy` and `gguf` Python packages.

What it does:
  * every GGUF tensor (F32, Q8_0, Q5_0, Q4_K, Q6_K, ...) is dequantized to
    float32 with gguf's reference dequantizer and reshaped to the PyTorch
    (row-major, out_features x in_features) layout -- GGUF lists dimensions
    innermost first;
  * GGUF names are mapped to the transformers `Gemma3ForCausalLM` names
    (token_embd -> model.embed_tokens, the output head is tied so there is no
    lm_head; output_norm -> model.norm; per block the four layer norms, the q/k
    head norms, the attention and GeGLU projections);
  * llama.cpp's HF->GGUF converter stores every Gemma RMSNorm weight as 1 + w
    (Gemma's norm computes x * (1 + w)); 1 is subtracted again, in float32, as
    transformers' GGUF loader does (Gemma2TensorProcessor, also used for gemma3);
  * there is no q/k row permutation to undo: llama.cpp only permutes
    llama-architecture checkpoints;
  * the norm weights are written as F32 (so 1 + w -> w loses nothing beyond
    what the GGUF's f32 already holds); every other tensor (embedding and
    projections) is rounded float32 -> bf16 with round-to-nearest-even;
  * the file is written with tensors in lexicographic name order, a compact
    JSON header padded with spaces to 8 bytes, and `{"format": "pt"}` as
    metadata, so that its bytes (and sha256) are reproducible.

Tensors are streamed one at a time, so peak memory is about one tensor
(the 262144 x 640 embedding: 640 MiB in float32).
"""
import os
import sys

import numpy as np
from gguf import GGUFReader, dequantize

sys.dont_write_bytecode = True  # no scripts/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_to_safetensors import bf16_bits, write_plan  # noqa: E402  (same rounding and file layout as SmolLM2)

TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}

PER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

NORMS = {"attn_q_norm", "attn_k_norm", "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"}


def die(msg):
    raise SystemExit(f"gemma3_gguf_to_safetensors: {msg}")


def field_value(reader, key):
    if key not in reader.fields:
        die(f"GGUF has no {key!r}")
    return reader.fields[key].contents()


def hf_name(gguf_name):
    """(HF name, is_norm) for a GGUF tensor name."""
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name], gguf_name == "output_norm.weight"
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in PER_LAYER or parts[3] != "weight":
        die(f"unexpected tensor {gguf_name!r}")
    _, layer, kind, suffix = parts
    return f"model.layers.{int(layer)}.{PER_LAYER[kind]}.{suffix}", kind in NORMS


class Plan:
    """Name, shape, dtype and a loader for every output tensor, before any data is read."""

    def __init__(self, reader):
        arch = field_value(reader, "general.architecture")
        if arch != "gemma3":
            die(f"general.architecture is {arch!r}, expected 'gemma3'")
        layers = int(field_value(reader, "gemma3.block_count"))
        self.entries = {}
        for t in reader.tensors:
            name, is_norm = hf_name(t.name)
            if name in self.entries:
                die(f"duplicate tensor {name}")
            shape = tuple(int(d) for d in t.shape.tolist()[::-1])
            self.entries[name] = (shape, is_norm, t)
        expected = set(TOP_LEVEL.values()) | {
            f"model.layers.{i}.{v}.weight" for i in range(layers) for v in PER_LAYER.values()
        }
        if set(self.entries) != expected:
            missing = sorted(expected - set(self.entries))
            extra = sorted(set(self.entries) - expected)
            die(f"tensor set mismatch: missing {missing[:5]}, unexpected {extra[:5]}")

    def names(self):
        return sorted(self.entries)

    def load(self, name):
        shape, is_norm, t = self.entries[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if is_norm:
            return np.ascontiguousarray(w - np.float32(1.0), dtype="<f4")
        return bf16_bits(w)

    def stored(self, name):
        """(safetensors dtype, bytes per element, shape): norms in f32, the rest in bf16."""
        shape, is_norm, _ = self.entries[name]
        return ("F32", 4, shape) if is_norm else ("BF16", 2, shape)


def convert(src, dst):
    write_plan(Plan(GGUFReader(src)), dst, "gemma3_gguf_to_safetensors")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(sys.argv[1], sys.argv[2])
