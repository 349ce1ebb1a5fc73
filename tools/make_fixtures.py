#!/usr/bin/env python3
"""Tiny random Hugging Face MoE checkpoints plus transformers reference outputs.

Writes one directory per fixture (config.json, safetensors, generation_config.json, reference.json) under
--out. Run where torch + transformers 5.x + safetensors are installed (the GPU machine; CPU torch is
enough). See docs/fixtures.md for the reference.json format and how to regenerate.

Every reference is computed from the directory as written: the checkpoint is loaded back with
transformers in float32 with eager attention, so the reference sees exactly the stored (rounded) weights.
"""

import argparse
import collections
import json
import os
import re
import shutil
import sys
import traceback

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from reference_json import fmt, write_reference

PROMPT_LEN = 12
GREEDY_LEN = 16
HIDDEN = 64
EOS_ID = 2
BOS_ID = 1
SEED_CANDIDATES = 6
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Base fixtures, one per family, and variants that need their own weights. Seeds pick the weights; the
# search below tries SEED_CANDIDATES seeds from `seed` and keeps the one with the widest decision margins.
SPECS = [
    dict(name="mixtral", family="mixtral", dtype="bfloat16", vocab=512, layers=2, theta=1e6, seed=100),
    dict(name="qwen2_moe", family="qwen2_moe", dtype="bfloat16", vocab=512, layers=3, theta=50000.0, seed=200),
    dict(name="qwen3_moe", family="qwen3_moe", dtype="bfloat16", vocab=512, layers=2, theta=1e6, seed=300),
    dict(name="olmoe", family="olmoe", dtype="bfloat16", vocab=512, layers=2, theta=10000.0, seed=400),
    dict(name="olmoe_f16", family="olmoe", dtype="float16", vocab=256, layers=2, theta=10000.0, seed=500),
    dict(name="qwen3_moe_f32", family="qwen3_moe", dtype="float32", vocab=256, layers=1, theta=1e6, seed=600),
    dict(name="qwen3_moe_tied", family="qwen3_moe", dtype="bfloat16", vocab=256, layers=2, theta=1e6, seed=700,
         tie=True),
]
# Variants that only repackage a base fixture: the reference must come out identical to the base's.
DERIVED = [
    dict(name="mixtral_alt_layout", base="mixtral", transform="alt_layout"),
    # Hub Qwen3-MoE checkpoints spell the expert count `num_experts`; transformers 5 writes `num_local_experts`.
    dict(name="qwen3_moe_sharded", base="qwen3_moe", transform="shard2+hub_names"),
    dict(name="olmoe_rope_alt", base="olmoe", transform="rope_alt"),
]


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------- config
def make_config(spec):
    fam = spec["family"]
    common = dict(vocab_size=spec["vocab"], hidden_size=HIDDEN, num_hidden_layers=spec["layers"],
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=spec.get("tie", False), bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if fam == "mixtral":
        cls = transformers.MixtralConfig
        extra = dict(intermediate_size=40, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                     sliding_window=None)
    elif fam == "qwen2_moe":
        cls = transformers.Qwen2MoeConfig
        # layer 1 dense (mlp_only_layers) so the MoE layers are 0 and 2: router outputs skip the middle one.
        extra = dict(intermediate_size=128, moe_intermediate_size=40, shared_expert_intermediate_size=96,
                     num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
                     mlp_only_layers=[1] if spec["layers"] >= 3 else [], qkv_bias=True, rms_norm_eps=1e-6,
                     use_sliding_window=False)
    elif fam == "qwen3_moe":
        cls = transformers.Qwen3MoeConfig
        extra = dict(intermediate_size=96, moe_intermediate_size=40, num_experts=8, num_experts_per_tok=4,
                     norm_topk_prob=True, head_dim=32, decoder_sparse_step=1, mlp_only_layers=[],
                     attention_bias=False, rms_norm_eps=1e-6, use_sliding_window=False)
    elif fam == "olmoe":
        cls = transformers.OlmoeConfig
        extra = dict(intermediate_size=40, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                     rms_norm_eps=1e-5, clip_qkv=None, attention_bias=False)
    else:
        raise ValueError(fam)
    kwargs = dict(common, **extra, rope_parameters={"rope_type": "default", "rope_theta": spec["theta"]})
    while True:
        try:
            return cls(**kwargs)
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if not m or m.group(1) not in kwargs:
                raise
            log(f"  {cls.__name__} rejects {m.group(1)}; retrying without it")
            if m.group(1) == "rope_parameters":
                kwargs["rope_theta"] = spec["theta"]
            kwargs.pop(m.group(1))


def num_experts_of(cfg):
    return getattr(cfg, "num_local_experts", None) or cfg.num_experts


# ----------------------------------------------------------------------------------------------- weights
def init_weights(model, seed):
    """Weights large enough that logits spread over several units and routing depends on the token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "shared_expert_gate" in name:
                p.copy_(0.3 * noise)
            elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                p.copy_(0.2 * noise)
            elif "experts" in name or "shared_expert" in name or "embed" in name or "lm_head" in name:
                p.copy_(0.15 * noise)
            else:
                p.copy_(0.1 * noise)


def round_weights(model, dtype):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def build(spec, seed):
    cfg = make_config(spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    init_weights(model, seed)
    round_weights(model, DTYPES[spec["dtype"]])
    return model


def load(path):
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    return model.float().eval()


def state_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        return f"key mismatch: {sorted(set(sa) ^ set(sb))[:8]}"
    worst = 0.0
    for k in sa:
        if sa[k].shape != sb[k].shape:
            return f"shape mismatch {k}: {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}"
        worst = max(worst, float((sa[k].float() - sb[k].float()).abs().max()) if sa[k].numel() else 0.0)
    return worst


# ----------------------------------------------------------------------------------------------- evaluation
def moe_blocks(model):
    blocks = []
    for idx, layer in enumerate(model.model.layers):
        blk = getattr(layer, "mlp", None)
        if blk is None or not hasattr(blk, "experts"):
            blk = getattr(layer, "block_sparse_moe", blk)
        if blk is not None and hasattr(blk, "experts") and hasattr(blk, "gate"):
            blocks.append((idx, blk))
    return blocks


def forward_capture(model, ids):
    """One full forward; returns (output, {layer: moe input}, {layer: router module output})."""
    inputs, gate_out = {}, {}
    hooks = []
    for idx, blk in moe_blocks(model):
        def pre(mod, args, kwargs, idx=idx):
            x = args[0] if args else kwargs["hidden_states"]
            inputs[idx] = x.detach().clone()
        def post(mod, args, out, idx=idx):
            gate_out[idx] = out
        hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(blk.gate.register_forward_hook(post))
    try:
        with torch.no_grad():
            try:
                out = model(input_ids=ids[None], output_router_logits=True, use_cache=False)
            except TypeError:
                out = model(input_ids=ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out, inputs, gate_out


def router_logits_of(model, inputs):
    res = []
    for idx, blk in moe_blocks(model):
        x = inputs[idx].reshape(-1, inputs[idx].shape[-1]).float()
        bias = getattr(blk.gate, "bias", None)
        res.append((idx, F.linear(x, blk.gate.weight.float(), bias)))
    return res


def describe_router(notes, out, routers, topk, gate_out, model, top_k):
    """Records what transformers returns as router logits and what its router module outputs."""
    notes["moe_layers"] = [idx for idx, _ in routers]
    rec = getattr(out, "router_logits", None)
    desc = []
    if rec is not None:
        rec = [r for r in rec if r is not None]
        for (idx, rl), r in zip(routers, rec):
            r = r.reshape(-1, rl.shape[-1]).float()
            desc.append(dict(layer=idx, recorded_shape=list(r.shape),
                             diff_vs_raw_logits=float((r - rl).abs().max()),
                             diff_vs_softmax=float((r - rl.softmax(-1)).abs().max())))
    notes["output_router_logits"] = desc if rec is not None else "not returned"
    gdesc = []
    for (idx, rl), tk in zip(routers, topk):
        o = gate_out[idx]
        items = o if isinstance(o, (tuple, list)) else (o,)
        parts = []
        for it in items:
            if not torch.is_tensor(it):
                parts.append(str(type(it)))
                continue
            d = dict(shape=list(it.shape), dtype=str(it.dtype))
            if it.dtype in (torch.int64, torch.int32) and it.shape[-1] == top_k:
                d["equals_topk_ids_in_order"] = bool((it.reshape(tk.shape) == tk).all())
            elif it.shape[-1] == rl.shape[-1]:
                it2 = it.reshape(rl.shape).float()
                d["diff_vs_raw_logits"] = float((it2 - rl).abs().max())
                d["diff_vs_softmax"] = float((it2 - rl.softmax(-1)).abs().max())
            elif it.shape[-1] == top_k:
                p = rl.softmax(-1)
                top = torch.gather(p, -1, tk)
                d["diff_vs_topk_softmax"] = float((it.reshape(top.shape).float() - top).abs().max())
                d["diff_vs_topk_softmax_renorm"] = float(
                    (it.reshape(top.shape).float() - top / top.sum(-1, keepdim=True)).abs().max())
            parts.append(d)
        gdesc.append(dict(layer=idx, module=type(moe_blocks(model)[0][1].gate).__name__, outputs=parts))
    notes["router_module_outputs"] = gdesc


def evaluate(model, prompt, notes=None):
    cfg = model.config
    top_k = cfg.num_experts_per_tok
    with torch.no_grad():
        out, inputs, gate_out = forward_capture(model, prompt)
        logits = out.logits[0].float()
        routers = router_logits_of(model, inputs)
        topk = [torch.topk(rl, top_k, dim=-1).indices for _, rl in routers]

        if notes is not None:
            try:
                describe_router(notes, out, routers, topk, gate_out, model, top_k)
            except Exception as e:  # noqa: BLE001 - descriptive only
                notes["error"] = repr(e)

        # Greedy continuation without cache: argmax of transformers' own logits, nothing else in between.
        seq = prompt.tolist()
        margins = []
        for _ in range(GREEDY_LEN):
            lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            two = torch.topk(lg, 2).values
            margins.append(float(two[0] - two[1]))
            seq.append(int(lg.argmax()))
        greedy = seq[len(prompt):]

        # Router decision margins over every position the greedy run goes through.
        _, inputs_all, _ = forward_capture(model, torch.tensor(seq))
        router_margin = float("inf")
        for _, rl in router_logits_of(model, inputs_all):
            s = torch.sort(rl, dim=-1, descending=True).values
            router_margin = min(router_margin, float((s[:, top_k - 1] - s[:, top_k]).min()))
            for j in range(top_k - 1):  # order inside the top-k matters too (ids are compared best first)
                router_margin = min(router_margin, float((s[:, j] - s[:, j + 1]).min()))

    distinct_sets = [len({tuple(sorted(r)) for r in t.tolist()}) for t in topk]
    return dict(logits=logits, routers=routers, topk=topk, greedy=greedy, greedy_margin=min(margins),
                router_margin=router_margin, distinct_sets=distinct_sets)


def score(ev):
    no_special = not any(t in (EOS_ID, BOS_ID) for t in ev["greedy"])
    varied = min(ev["distinct_sets"]) >= 5
    return (no_special, varied, min(len(set(ev["greedy"])), 14), min(ev["greedy_margin"], ev["router_margin"]))


def check_generate(model, prompt, greedy):
    try:
        with torch.no_grad():
            gen = model.generate(input_ids=prompt[None], max_new_tokens=GREEDY_LEN, do_sample=False,
                                 pad_token_id=0)
        return gen[0, len(prompt):].tolist() == greedy
    except Exception as e:  # noqa: BLE001 - only a cross-check
        return f"generate failed: {e!r}"


# ----------------------------------------------------------------------------------------------- writing
def make_reference(name, path, ev, dtype_name):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return {
        "name": name,
        "architecture": cfg["architectures"][0],
        "transformers_version": transformers.__version__,
        "torch_dtype": dtype_name,
        "prompt_ids": ev["prompt"],
        "logits": [[fmt(x) for x in r] for r in ev["logits"].tolist()],
        "router_logits": [[[fmt(x) for x in r] for r in rl.tolist()] for _, rl in ev["routers"]],
        "topk_ids": [t.tolist() for t in ev["topk"]],
        "greedy_ids": ev["greedy"],
    }


def tensor_table(path):
    table = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    table[k] = dict(shape=list(t.get_shape()), dtype=str(t.get_dtype()), file=fn)
    return table


def print_table(title, table):
    log(f"  {title}: {len(table)} tensors")
    for k in sorted(table):
        m = re.search(r"layers\.(\d+)\.", k)
        if m and int(m.group(1)) > 1:
            continue  # deeper layers repeat layer 0/1
        if re.search(r"experts\.([1-9]\d*)\.", k):
            continue  # per-expert names repeat expert 0
        v = table[k]
        log(f"    {k:60s} {v['dtype']:8s} {v['shape']}")


def load_sd(path):
    sd = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
    return sd


# ----------------------------------------------------------------------------------------------- variants
PER_EXPERT_RE = re.compile(r"^(.*)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")


def fused_to_per_expert(sd, family, inter, hidden):
    out = {}
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    for k, t in sd.items():
        m = re.match(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$", k)
        if not m:
            if family == "mixtral":
                k = k.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            out[k] = t
            continue
        prefix, what = m.groups()
        n = t.shape[0]
        for e in range(n):
            te = t[e]
            if what == "gate_up_proj":
                if tuple(te.shape) == (2 * inter, hidden):
                    gate, up = te[:inter], te[inter:]
                elif tuple(te.shape) == (hidden, 2 * inter):
                    gate, up = te[:, :inter].t(), te[:, inter:].t()
                else:
                    raise ValueError(f"{k}: unexpected shape {tuple(t.shape)}")
                out[f"{prefix}.{block}.experts.{e}.{names[0]}.weight"] = gate.contiguous()
                out[f"{prefix}.{block}.experts.{e}.{names[1]}.weight"] = up.contiguous()
            else:
                if tuple(te.shape) == (hidden, inter):
                    down = te
                elif tuple(te.shape) == (inter, hidden):
                    down = te.t()
                else:
                    raise ValueError(f"{k}: unexpected shape {tuple(t.shape)}")
                out[f"{prefix}.{block}.experts.{e}.{names[2]}.weight"] = down.contiguous()
    return out


def transform_alt_layout(path, base_model, spec):
    sd = load_sd(path)
    per_expert = any(PER_EXPERT_RE.match(k) for k in sd)
    dtype = DTYPES[spec["dtype"]]
    if per_expert:
        # transformers' own runtime names are the fused layout; write those.
        tied = getattr(base_model.config, "tie_word_embeddings", False)
        new = {k: v.to(dtype).contiguous() for k, v in base_model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
        layout = "fused (runtime state_dict names)"
    else:
        cfg = base_model.config
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        new = fused_to_per_expert(sd, spec["family"], inter, cfg.hidden_size)
        layout = "per-expert"
    for fn in os.listdir(path):
        if fn.endswith(".safetensors") or fn.endswith(".index.json"):
            os.remove(os.path.join(path, fn))
    save_file(new, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return f"saved layout per-expert={per_expert}; wrote {layout}"


def transform_shard2(path, base_model, spec):
    sd = load_sd(path)
    first = lambda k: "embed_tokens" in k or ".layers.0." in k  # noqa: E731
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if first(k)},
              "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if not first(k)}}
    os.remove(os.path.join(path, "model.safetensors"))
    weight_map, total = {}, 0
    for fn, part in shards.items():
        save_file(part, os.path.join(path, fn), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fn
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return f"2 shards: {[len(p) for p in shards.values()]} tensors"


def transform_rope_alt(path, base_model, spec):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if isinstance(params, dict) and "rope_theta" in params:
        # transformers 5 nests theta; write the older top-level form as pre-5 checkpoints have it.
        theta = params["rope_theta"]
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = None
        what = "moved rope_theta from rope_parameters to top level (rope_scaling null)"
    else:
        theta = cfg.pop("rope_theta")
        cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
        what = "moved top-level rope_theta into rope_parameters"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return what


def transform_hub_names(path, base_model, spec):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "num_local_experts" not in cfg:
        return "config already says num_experts"
    cfg["num_experts"] = cfg.pop("num_local_experts")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return "renamed num_local_experts to num_experts in config.json"


TRANSFORMS = {"alt_layout": transform_alt_layout, "shard2": transform_shard2, "rope_alt": transform_rope_alt,
              "hub_names": transform_hub_names}


def apply_transforms(names, path, base_model, spec):
    return "; ".join(TRANSFORMS[t](path, base_model, spec) for t in names.split("+"))


# ----------------------------------------------------------------------------------------------- driver
def prompt_for(spec):
    g = torch.Generator().manual_seed(spec["seed"] + 7)
    return torch.randint(3, spec["vocab"], (PROMPT_LEN,), generator=g)


def summarize(name, ev, facts):
    lg = ev["logits"]
    log(f"  [{name}] logits std {float(lg.std()):.3f} range [{float(lg.min()):.2f}, {float(lg.max()):.2f}]"
        f" greedy {ev['greedy']} distinct {len(set(ev['greedy']))} greedy_margin {ev['greedy_margin']:.4g}"
        f" router_margin {ev['router_margin']:.4g} distinct_topk_sets {ev['distinct_sets']}")
    facts.update(greedy_margin=ev["greedy_margin"], router_margin=ev["router_margin"],
                 distinct_topk_sets=ev["distinct_sets"], logits_std=float(lg.std()))


def finalize(spec_name, path, dtype_name, prompt, ref_model, facts):
    loaded = load(path)
    facts["weights_vs_source_max_diff"] = state_diff(loaded, ref_model)
    log(f"  [{spec_name}] reloaded weights vs source: {facts['weights_vs_source_max_diff']}")
    notes = {}
    ev = evaluate(loaded, prompt, notes)
    ev["prompt"] = prompt.tolist()
    facts["router_notes"] = notes
    facts["generate_matches_manual_greedy"] = check_generate(loaded, prompt, ev["greedy"])
    log(f"  [{spec_name}] generate() == manual greedy: {facts['generate_matches_manual_greedy']}")
    write_reference(os.path.join(path, "reference.json"), make_reference(spec_name, path, ev, dtype_name))
    facts["files"] = {fn: os.path.getsize(os.path.join(path, fn)) for fn in sorted(os.listdir(path))}
    facts["saved_tensors"] = tensor_table(path)
    with open(os.path.join(path, "config.json")) as f:
        facts["config_json"] = json.load(f)
    summarize(spec_name, ev, facts)
    return ev, loaded


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--facts", default=None)
    ap.add_argument("--only", default=None, help="comma-separated fixture names")
    args = ap.parse_args()
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    log(f"python {sys.version.split()[0]} torch {torch.__version__} transformers {transformers.__version__}")
    os.makedirs(args.out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    all_facts = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                 "fixtures": {}}
    bases = {}
    failed = []
    for spec in SPECS:
        if only and spec["name"] not in only and not any(d["base"] == spec["name"] for d in DERIVED
                                                         if d["name"] in only):
            continue
        name = spec["name"]
        log(f"== {name} ({spec['family']}, {spec['dtype']})")
        facts = {"spec": spec}
        try:
            prompt = prompt_for(spec)
            best = None
            for seed in range(spec["seed"], spec["seed"] + SEED_CANDIDATES):
                ev = evaluate(build(spec, seed), prompt)
                sc = score(ev)
                log(f"  seed {seed}: score {sc}")
                if best is None or sc > best[0]:
                    best = (sc, seed)
            seed = best[1]
            facts["seed"] = seed
            model = build(spec, seed)
            if spec["family"] in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe") and name == spec["family"]:
                log(f"  runtime state_dict (transformers {transformers.__version__} module names):")
                for k, v in model.state_dict().items():
                    m = re.search(r"layers\.(\d+)\.", k)
                    if not m or int(m.group(1)) <= 1:
                        log(f"    {k:60s} {list(v.shape)}")
                log(f"  module classes: layer0.mlp={type(model.model.layers[0].mlp).__name__}"
                    f" gate={type(model.model.layers[0].mlp.gate).__name__ if hasattr(model.model.layers[0].mlp, 'gate') else '-'}")
                facts["runtime_state_dict"] = {k: list(v.shape) for k, v in model.state_dict().items()}
            path = os.path.join(args.out, name)
            shutil.rmtree(path, ignore_errors=True)
            dtype = DTYPES[spec["dtype"]]
            model.to(dtype)
            model.save_pretrained(path)
            model.to(torch.float32)
            print_table("saved by save_pretrained", tensor_table(path))
            with open(os.path.join(path, "config.json")) as f:
                cj = json.load(f)
            log("  config.json rope/dtype keys: " + json.dumps(
                {k: v for k, v in cj.items() if "rope" in k or "theta" in k or "dtype" in k}))
            ev, loaded = finalize(name, path, spec["dtype"], prompt, model, facts)
            bases[name] = (spec, prompt, loaded, ev)
        except Exception:  # noqa: BLE001 - keep going so one call yields every fixture that works
            traceback.print_exc()
            failed.append(name)
            facts["error"] = traceback.format_exc()
        all_facts["fixtures"][name] = facts

    for d in DERIVED:
        if only and d["name"] not in only:
            continue
        name = d["name"]
        log(f"== {name} (from {d['base']}, {d['transform']})")
        facts = {"derived": d}
        try:
            spec, prompt, base_model, base_ev = bases[d["base"]]
            path = os.path.join(args.out, name)
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(os.path.join(args.out, d["base"]), path)
            os.remove(os.path.join(path, "reference.json"))
            facts["transform"] = apply_transforms(d["transform"], path, base_model, spec)
            log(f"  {facts['transform']}")
            print_table("written", tensor_table(path))
            ev, _ = finalize(name, path, spec["dtype"], prompt, base_model, facts)
            same = dict(
                logits=float((ev["logits"] - base_ev["logits"]).abs().max()),
                router=max(float((a[1] - b[1]).abs().max()) for a, b in zip(ev["routers"], base_ev["routers"])),
                topk=all(bool((a == b).all()) for a, b in zip(ev["topk"], base_ev["topk"])),
                greedy=ev["greedy"] == base_ev["greedy"])
            facts["vs_base"] = same
            log(f"  vs base {d['base']}: {same}")
            if same["logits"] > 1e-5 or not same["topk"] or not same["greedy"]:
                raise RuntimeError(f"{name} does not reproduce {d['base']}: {same}")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
            facts["error"] = traceback.format_exc()
        all_facts["fixtures"][name] = facts

    if args.facts:
        with open(args.facts, "w") as f:
            json.dump(all_facts, f, indent=1, default=str)
    log(f"failed: {failed}" if failed else "all fixtures written")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
