#!/usr/bin/env python3
"""transformers + accelerate offload, the baseline of moex's expert-offloading benchmark: a model of the given
config.json's shapes cut to --layers decoder layers, random bf16 weights in host RAM, dispatched by accelerate
with `device_map` under a GPU budget so small that every decoder layer is offloaded to the CPU (accelerate then
moves each layer's weights to the GPU at every forward, as `device_map="auto"` does for the layers that do not
fit). Greedy decode at batch 1; ms per token over the decode steps (prefill and first token excluded), and per
offloaded layer, from which the full model's time at a GPU budget follows:
    full = offloaded_layers x ms_per_layer (+ the resident layers, near zero next to them).

Usage: accelerate_offload.py MODEL_DIR [--layers 2] [--tokens 4] [--prompt-len 8] [--json FILE]
Prints one JSON line: {"peer": "accelerate", "ms_per_token": ..., "ms_per_offloaded_layer": ..., ...}.
Exits 3 with a message when accelerate is not installed.
"""
import argparse
import json
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from hf_decode_timing import decode_ms_per_token

try:
    import accelerate
    from accelerate import dispatch_model
except ImportError:
    print("accelerate_offload.py: accelerate is not installed", file=sys.stderr)
    sys.exit(3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(16)
    cfg = AutoConfig.from_pretrained(args.model_dir)
    full_layers = cfg.num_hidden_layers
    cfg.num_hidden_layers = args.layers
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    # Embeddings, final norm, rotary tables and lm head on the GPU; every decoder layer offloaded to the CPU and
    # run on the GPU (accelerate's hooks copy its weights in at each forward).
    device_map = {"lm_head": 0}
    for name, _ in model.model.named_children():
        if name != "layers":
            device_map[f"model.{name}"] = 0
    for idx in range(args.layers):
        device_map[f"model.layers.{idx}"] = "cpu"
    offloaded = args.layers
    model = dispatch_model(model, device_map=device_map, main_device=0)
    build_s = time.perf_counter() - start

    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), device="cuda")
    ms, steps = decode_ms_per_token(model, prompt, args.tokens, warmup_tokens=2, reps=1)  # seconds a token: one timing
    per_layer = ms / max(offloaded, 1)
    result = {
        "peer": "accelerate",
        "versions": {"transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "model_dir": args.model_dir,
        "layers": args.layers,
        "offloaded_layers": offloaded,
        "tokens": steps,
        "ms_per_token": ms,
        "ms_per_offloaded_layer": per_layer,
        # Every layer of the full model offloaded; a GPU budget that holds some of them takes those off.
        "full_model_layers": full_layers,
        "ms_per_token_full_model_all_offloaded": per_layer * full_layers,
        "build_s": build_s,
        "gpu": torch.cuda.get_device_name(0),
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
