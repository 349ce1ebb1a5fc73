#!/usr/bin/env python3
"""How far a checkpoint's bf16 expert weights would shrink in a lossless 12-bit packing: each weight as its
sign+mantissa byte plus a 4-bit index into its tensor's 15 most frequent exponents, the rare other exponents kept
as exceptions. Decode with experts offloaded is bound by host DRAM bytes per token (docs/offloading.md), so this
ratio is what such a packing would take off every missed expert, copied or run on the CPU.

Usage: exponent_stats.py MODEL_DIR_OR_SAFETENSORS [--all-tensors] [--json]
Reads every *.safetensors file of a directory (standard library only). By default only tensors whose name holds
".experts." are counted.
"""
import argparse
import collections
import json
import math
import os
import struct
import sys

EXCEPTION_BYTES = 6  # a 4-byte position and the 2-byte raw weight


def tensors(path):
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: header is not JSON ({e})")
        base = 8 + n
        size = os.path.getsize(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if base + end > size:
                raise ValueError(f"{path}: tensor {name} ends past the file (truncated?)")
            if info["dtype"] != "BF16":
                continue
            f.seek(base + begin)
            yield name, f.read(end - begin)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model directory (its *.safetensors files) or one .safetensors file")
    ap.add_argument("--all-tensors", action="store_true", help="count every bf16 tensor, not only experts")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = ap.parse_args()
    if os.path.isdir(args.model):
        files = sorted(os.path.join(args.model, f) for f in os.listdir(args.model) if f.endswith(".safetensors"))
    else:
        files = [args.model]
    if not files or not all(os.path.isfile(f) for f in files):
        sys.exit(f"exponent_stats.py: no .safetensors file at {args.model}")
    weights = escapes = 0
    entropy_bits = 0.0
    count = 0
    try:
        for path in files:
            for name, raw in tensors(path):
                if not args.all_tensors and ".experts." not in name:
                    continue
                values = struct.unpack(f"<{len(raw) // 2}H", raw)
                exponents = collections.Counter((v >> 7) & 0xFF for v in values)
                n = len(values)
                kept = sum(c for _, c in exponents.most_common(15))
                escapes += n - kept
                entropy_bits += -sum(c * math.log2(c / n) for c in exponents.values())
                weights += n
                count += 1
    except (ValueError, KeyError, struct.error) as e:
        sys.exit(f"exponent_stats.py: {e}")
    if weights == 0:
        sys.exit("exponent_stats.py: no bf16 tensor to count (expert tensors hold '.experts.'; see --all-tensors)")
    ratio = 0.75 + escapes * EXCEPTION_BYTES / (2 * weights)
    result = {"tensors": count, "weights": weights, "escape_rate": escapes / weights,
              "exponent_entropy_bits": entropy_bits / weights, "packed_over_bf16": ratio}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{count} tensors, {weights} bf16 weights: exponent entropy {result['exponent_entropy_bits']:.2f} "
              f"bits a weight; outside the 15 most frequent exponents {result['escape_rate']:.2e}; a 12-bit "
              f"packing would hold {ratio:.4f} of the bf16 bytes")


if __name__ == "__main__":
    main()
