"""Greedy decode timing shared by the Hugging Face peers (transformers_decode.py, accelerate_offload.py): ms per
token over the decode steps only, the prefill and first token subtracted (a 1-token generate timed apart), as in
moex's decode_ms."""
import time

import torch


def decode_ms_per_token(model, prompt, tokens, warmup_tokens=4, reps=3):
    """Returns (ms per decode step, steps timed) for `tokens` greedy steps after `prompt` (batch 1, on the GPU): the
    fastest of `reps` timings, each a 1-token generate subtracted from a (tokens + 1)-token one: the peer's steady
    state, the figure a comparison owes it. One timing had varied 2.3x between two processes on a freshly started
    GPU machine (30.1 vs 13.1 ms/token, Model A, transformers eager, H200); with the best of 3 the first process
    still measured 22.7 and the next 14.2, so compare against the fastest process of a call, not the first."""
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    best, steps = None, 0
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=warmup_tokens, min_new_tokens=warmup_tokens, **gen)
        torch.cuda.synchronize()
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **gen)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **gen)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            steps = out.shape[1] - prompt.shape[1] - 1
            ms = ((t2 - t1) - (t1 - t0)) * 1e3 / steps
            best = ms if best is None else min(best, ms)
    return best, steps
