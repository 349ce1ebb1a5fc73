#!/usr/bin/env python3
"""Writes a random-weight GGUF of a Mixtral-shaped model (llama.cpp's "llama" architecture with experts) from a
Hugging Face config.json, so that llama.cpp runs the same shapes as `moex bench --load-format random` in the same
device call. Only numpy is needed; the format is written here (GGUF v3), not through llama.cpp's gguf-py.

  python3 bench/peers/make_gguf.py bench/cuda/models/model_a/config.json /tmp/model_a.gguf
  python3 bench/peers/make_gguf.py bench/offload/models/mixtral_8x7b/config.json /tmp/l4.gguf --layers 4

Weights: bf16, N(0, 0.02) drawn once into a 64 MiB pool and tiled from a random offset per tensor (speed does not
depend on the values, and writing a 12 GB file then takes seconds, not minutes); norm weights are fp32 ones. The
vocabulary is llama.cpp's "none" tokenizer with `vocab_size` dummy tokens: llama-bench only draws random ids.
"""
import argparse
import json
import struct
import sys

import numpy as np

GGUF_MAGIC = 0x46554747
ALIGN = 32
T_F32, T_BF16 = 0, 30
V_UINT32, V_FLOAT32, V_STRING = 4, 6, 8


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, value):
    if isinstance(value, str):
        return gguf_string(key) + struct.pack("<I", V_STRING) + gguf_string(value)
    if isinstance(value, float):
        return gguf_string(key) + struct.pack("<If", V_FLOAT32, value)
    return gguf_string(key) + struct.pack("<II", V_UINT32, value)


def tensors_of(c, layers):
    """(name, ggml dims with the fastest first, type) in llama.cpp's naming (src/models/llama.cpp)."""
    h, v = c["hidden_size"], c["vocab_size"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    ff, experts = c["intermediate_size"], c["num_local_experts"]
    out = [("token_embd.weight", [h, v], T_BF16), ("output_norm.weight", [h], T_F32),
           ("output.weight", [h, v], T_BF16)]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", [h], T_F32), (b + "attn_q.weight", [h, heads * hd], T_BF16),
                (b + "attn_k.weight", [h, kv_heads * hd], T_BF16), (b + "attn_v.weight", [h, kv_heads * hd], T_BF16),
                (b + "attn_output.weight", [heads * hd, h], T_BF16), (b + "ffn_norm.weight", [h], T_F32),
                (b + "ffn_gate_inp.weight", [h, experts], T_BF16),
                (b + "ffn_gate_exps.weight", [h, ff, experts], T_BF16),
                (b + "ffn_down_exps.weight", [ff, h, experts], T_BF16),
                (b + "ffn_up_exps.weight", [h, ff, experts], T_BF16)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a Hugging Face config.json of a Mixtral-shaped model")
    ap.add_argument("out", help="the .gguf file to write")
    ap.add_argument("--layers", type=int, help="layers to write (default: the config's num_hidden_layers)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try:
        c = json.load(open(a.config))
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"make_gguf: cannot read {a.config}: {e}")
    if a.layers is not None and a.layers < 1:
        sys.exit(f"make_gguf: --layers {a.layers}: need at least one layer")
    if c.get("model_type") not in ("mixtral", "llama") or "num_local_experts" not in c:
        sys.exit(f"make_gguf: {a.config} is not a Mixtral-shaped config (model_type mixtral, num_local_experts)")
    layers = a.layers or c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // heads
    meta = [("general.architecture", "llama"), ("general.name", "moex random " + c["model_type"]),
            ("general.alignment", ALIGN), ("llama.block_count", layers),
            ("llama.context_length", c.get("max_position_embeddings", 4096)),
            ("llama.embedding_length", c["hidden_size"]), ("llama.feed_forward_length", c["intermediate_size"]),
            ("llama.attention.head_count", heads), ("llama.attention.head_count_kv", c["num_key_value_heads"]),
            ("llama.attention.key_length", hd), ("llama.attention.value_length", hd),
            ("llama.rope.dimension_count", hd), ("llama.rope.freq_base", float(c.get("rope_theta", 10000.0))),
            ("llama.attention.layer_norm_rms_epsilon", float(c.get("rms_norm_eps", 1e-5))),
            ("llama.expert_count", c["num_local_experts"]), ("llama.expert_used_count", c["num_experts_per_tok"]),
            ("llama.vocab_size", c["vocab_size"]), ("tokenizer.ggml.model", "none")]
    tensors = tensors_of(c, layers)
    header = struct.pack("<IIQQ", GGUF_MAGIC, 3, len(tensors), len(meta)) + b"".join(kv(k, v) for k, v in meta)
    offset, sizes = 0, []
    for name, dims, t in tensors:
        size = int(np.prod(dims)) * (4 if t == T_F32 else 2)
        header += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        header += struct.pack("<IQ", t, offset)
        sizes.append(size)
        offset += (size + ALIGN - 1) // ALIGN * ALIGN
    header += b"\0" * (-len(header) % ALIGN)
    sizes_total = sum(sizes)

    rng = np.random.default_rng(a.seed)
    pool_elems = 32 << 20
    pool = (rng.standard_normal(pool_elems, dtype=np.float32) * 0.02).view(np.uint32)
    pool = ((pool + 0x7FFF + ((pool >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even bf16
    pool = np.concatenate([pool, pool])  # a tile may start anywhere in the first half
    ones = np.ones(c["hidden_size"], dtype=np.float32).tobytes()
    written, shown = 0, 0
    with open(a.out, "wb") as f:
        f.write(header)
        for (name, dims, t), size in zip(tensors, sizes):
            if t == T_F32:
                f.write(ones[:size])
            else:
                left = size // 2
                while left:
                    n = min(left, pool_elems)
                    start = int(rng.integers(0, pool_elems))
                    f.write(pool[start:start + n].tobytes())
                    left -= n
            f.write(b"\0" * (-size % ALIGN))
            written += size
            if written - shown >= 1 << 30 or written == sizes_total:
                shown = written
                print(f"\r{a.out}: {written / 1e9:6.2f} / {sizes_total / 1e9:.2f} GB", end="", file=sys.stderr,
                      flush=True)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()
