"""transformers-side helpers: config per preset, model construction, MoE block discovery, loading.

Written against transformers 5.x (fused expert tensors, rope_parameters) with fallbacks for 4.x names.
"""

import torch
import transformers
from transformers import AutoModelForCausalLM

from common import BOS_ID, EOS_ID, log


def make_config(p, vocab):
    common = dict(vocab_size=vocab, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                  num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"],
                  max_position_embeddings=1024, tie_word_embeddings=p["tie"], bos_token_id=BOS_ID,
                  eos_token_id=EOS_ID, pad_token_id=None, attention_dropout=0.0, initializer_range=0.02,
                  num_experts_per_tok=p["top_k"], router_aux_loss_coef=0.02, output_router_logits=False)
    if p["arch"] == "mixtral":
        cls = transformers.MixtralConfig
        extra = dict(intermediate_size=p["ffn"], num_local_experts=p["experts"], rms_norm_eps=1e-5,
                     sliding_window=None, router_jitter_noise=0.0)
        theta = 1e6
    elif p["arch"] == "qwen3_moe":
        cls = transformers.Qwen3MoeConfig
        extra = dict(intermediate_size=4 * p["hidden"], moe_intermediate_size=p["ffn"], num_experts=p["experts"],
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False,
                     rms_norm_eps=1e-6, use_sliding_window=False)
        theta = 1e6
    else:
        raise ValueError(p["arch"])
    try:
        return cls(**common, **extra, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        return cls(**common, **extra, rope_theta=theta)


def build_model(cfg, device):
    """fp32 master weights; grouped_mm experts when this transformers/torch has them (checked by a step)."""
    for impl in ("grouped_mm", None):
        try:
            kw = dict(attn_implementation="sdpa")
            if impl:
                kw["experts_implementation"] = impl
            model = AutoModelForCausalLM.from_config(cfg, **kw).to(device)
            ids = torch.randint(3, cfg.vocab_size, (2, 16), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=ids, labels=ids, output_router_logits=True)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            return model, impl or "default"
        except Exception as e:  # noqa: BLE001 - fall back to the library's default experts path
            log("build", f"experts_implementation={impl}: {type(e).__name__}: {str(e)[:300]}")
    raise RuntimeError("no experts implementation trains")


def moe_blocks(model):
    """(layer index, MoE block) for every MoE layer, in order."""
    blocks = []
    for idx, layer in enumerate(model.model.layers):
        for name in ("block_sparse_moe", "mlp"):
            blk = getattr(layer, name, None)
            if blk is not None and hasattr(blk, "experts") and hasattr(blk, "gate"):
                blocks.append((idx, blk))
                break
    return blocks


def residual_branches(model):
    """Modules whose outputs are added to the residual stream (attention, MoE)."""
    out = []
    for layer in model.model.layers:
        out.append(layer.self_attn)
        for name in ("block_sparse_moe", "mlp"):
            if hasattr(layer, name):
                out.append(getattr(layer, name))
                break
    return out


def add_dropout(model, p):
    """Dropout on the embedding and on each residual branch, as hooks: the saved model has none."""
    def hook(mod, inputs, out):
        if not mod.training or p <= 0:
            return None
        if isinstance(out, tuple):
            return (torch.nn.functional.dropout(out[0], p, True),) + tuple(out[1:])
        return torch.nn.functional.dropout(out, p, True)
    handles = [model.model.embed_tokens.register_forward_hook(hook)]
    handles += [m.register_forward_hook(hook) for m in residual_branches(model)]
    return handles


def load_model(path, device, dtype=torch.float32, attn="eager"):
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def count_params(model):
    seen, total = set(), 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            total += prm.numel()
    return total
