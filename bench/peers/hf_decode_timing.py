"""Greedy decode timing shared by the Hugging Face peers (transformers_decode.py, accelerate_offload.py): ms per
token over the decode steps only, the prefill and first token subtracted (a 1-token generate timed apart), as in
moex's decode_ms."""
import time

import torch


def decode_ms_per_token(model, prompt, tokens, warmup_tokens=4):
    """Returns (ms per decode step, steps timed) for `tokens` greedy steps after `prompt` (batch 1, on the GPU)."""
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=warmup_tokens, min_new_tokens=warmup_tokens, **gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **gen)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **gen)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    steps = out.shape[1] - prompt.shape[1] - 1
    return ((t2 - t1) - (t1 - t0)) * 1e3 / steps, steps
