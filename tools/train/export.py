"""Saving a trained model in Hugging Face layout, sample continuations, and reference.json.

reference.json follows docs/fixtures.md (the same keys and conventions as tools/make_fixtures.py):
logits of every prompt position, raw router logits [moe_layer][pos][expert] computed from each MoE
block's input, top-k ids best first, and 16 greedy tokens from a no-cache argmax loop, all from the
checkpoint loaded back in float32.
"""

import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationConfig

import hf_models
from common import BOS_ID, EOS_ID, log

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/
from reference_json import fmt, write_reference as write_json  # noqa: E402

REFERENCE_PROMPT = "The old man walked"
GREEDY_LEN = 16
SAMPLE_PROMPTS = ["The old man walked", "She opened the door and", "In the morning the", "The committee said that"]


def save_model(model, out, tokenizer_dir):
    model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.save_pretrained(out)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, fn), os.path.join(out, fn))
    # Sampling defaults for `moex run`: greedy decoding of a model this small loops quickly.
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=True, temperature=0.8, top_p=0.95,
                     max_new_tokens=64).save_pretrained(out)


def _generate(model, ids, device, **kw):
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), pad_token_id=EOS_ID, **kw)
    return out[0, len(ids):].tolist()


def samples(model, tok, device):
    res = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok.encode(prompt).ids
        greedy = _generate(model, ids, device, max_new_tokens=40, do_sample=False)
        entry = dict(prompt=prompt, greedy=prompt + tok.decode(greedy), sampled=[])
        for seed in range(3):
            torch.manual_seed(seed)
            s = _generate(model, ids, device, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95)
            entry["sampled"].append(prompt + tok.decode(s))
        res.append(entry)
        log("samples", json.dumps(entry))
    return res


def router_logits(model, ids):
    """One no-cache forward; returns (logits [pos][vocab], [(layer, raw router logits [pos][expert])])."""
    inputs, hooks = {}, []
    blocks = hf_models.moe_blocks(model)
    for idx, blk in blocks:
        def pre(mod, args, kwargs, idx=idx):
            inputs[idx] = (args[0] if args else kwargs["hidden_states"]).detach()
        hooks.append(blk.gate.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    routers = []
    for idx, blk in blocks:
        x = inputs[idx].reshape(-1, inputs[idx].shape[-1]).float()
        routers.append((idx, F.linear(x, blk.gate.weight.float())))
    return out.logits[0].float(), routers


def write_reference(model, tok, out_dir, name):
    device = next(model.parameters()).device
    prompt = tok.encode(REFERENCE_PROMPT).ids
    ids = torch.tensor(prompt, device=device)
    logits, routers = router_logits(model, ids)
    top_k = model.config.num_experts_per_tok
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(GREEDY_LEN):
            lg = model(input_ids=torch.tensor([seq], device=device), use_cache=False).logits[0, -1]
            seq.append(int(lg.argmax()))
    greedy = seq[len(prompt):]
    gen = _generate(model, prompt, device, max_new_tokens=GREEDY_LEN, do_sample=False)
    with open(os.path.join(out_dir, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    ref = {
        "name": name,
        "architecture": arch,
        "transformers_version": transformers.__version__,
        "torch_dtype": "bfloat16",
        "prompt_ids": prompt,
        "logits": [[fmt(x) for x in r] for r in logits.tolist()],
        "router_logits": [[[fmt(x) for x in r] for r in rl.tolist()] for _, rl in routers],
        "topk_ids": [torch.topk(rl, top_k, dim=-1).indices.tolist() for _, rl in routers],
        "greedy_ids": greedy,
    }
    write_json(os.path.join(out_dir, "reference.json"), ref)
    info = dict(prompt_ids=prompt, greedy_ids=greedy, greedy_text=tok.decode(greedy),
                generate_matches_manual_greedy=gen == greedy, moe_layers=[i for i, _ in routers])
    log("reference", json.dumps(info))
    return info
