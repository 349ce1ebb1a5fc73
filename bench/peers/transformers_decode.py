#!/usr/bin/env python3
"""transformers eager baseline for moex's CUDA decode benchmark: the same config.json shapes with random bf16
weights built directly on the GPU, greedy decode at batch 1, ms/token over the decode steps only (the
prefill of the prompt is excluded, as in moex's decode_ms). Eager attention and eager experts, as PEERS.md
measured ("eager"); --impl default keeps transformers' defaults (sdpa + grouped_mm).

Usage: transformers_decode.py MODEL_DIR [--tokens N] [--prompt-len P] [--impl eager|default] [--json FILE]
Prints one JSON line: {"peer": "transformers", "ms_per_token": ..., ...}.
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from hf_decode_timing import decode_ms_per_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--impl", choices=["eager", "default"], default="eager")
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(args.model_dir)
    kwargs = {"dtype": torch.bfloat16}
    if args.impl == "eager":
        kwargs["attn_implementation"] = "eager"
    start = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    if args.impl == "eager" and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.eval()
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start

    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), device="cuda")
    ms, steps = decode_ms_per_token(model, prompt, args.tokens)
    result = {
        "peer": "transformers",
        "version": transformers.__version__,
        "impl": args.impl,
        "model_dir": args.model_dir,
        "device": torch.cuda.get_device_name(0),
        "decode_tokens": steps,
        "ms_per_token": ms,
        "build_s": build_s,
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
