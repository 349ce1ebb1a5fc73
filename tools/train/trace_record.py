"""Expert activation traces of a trained model over held-out paragraphs, via transformers.

Format: ../shared/traces/README.md (one JSON object per line: model, num_layers, num_experts, top_k,
tokens [token][layer][k] best first, gate_weights same shape, token_ids, phase, ...). Each prompt gives two
consecutive lines with the same request_id: its prefill (BOS + up to 127 paragraph tokens) and its greedy
decode (the forwards whose inputs are generated tokens 1..16; token 1 comes out of the prefill).
Routing is recomputed from each MoE block's input exactly as the model routes: softmax over the raw
router logits in float32, top-k, renormalised over the k where the architecture does so.
"""

import gzip
import json

import torch
import torch.nn.functional as F
import transformers

import hf_models
from common import BOS_ID, log

PREFILL_MAX = 128
DECODE_LEN = 16
MIN_PARA_TOKENS = 24
BATCH = 16


def pick_prompts(data, limit):
    cands = []
    for doc, paras in zip(data.held_docs, data.held_paras):
        for p_idx, ids in enumerate(paras):
            if len(ids) >= MIN_PARA_TOKENS:
                cands.append((f"{doc['id']}/p{p_idx}", [BOS_ID] + ids[:PREFILL_MAX - 1]))
    if len(cands) > limit:
        step = len(cands) / limit
        cands = [cands[int(i * step)] for i in range(limit)]
    return cands


class Router:
    """Captures each MoE block's router input during a forward and turns it into top-k ids/weights."""

    def __init__(self, model):
        self.blocks = hf_models.moe_blocks(model)
        self.top_k = model.config.num_experts_per_tok
        self.renorm = bool(getattr(model.config, "norm_topk_prob", True))
        self.inputs, self.gate_out = {}, {}
        self.hooks = []
        for idx, blk in self.blocks:
            def pre(mod, args, kwargs, idx=idx):
                self.inputs[idx] = (args[0] if args else kwargs["hidden_states"]).detach()

            def post(mod, args, out, idx=idx):
                self.gate_out[idx] = out
            self.hooks.append(blk.gate.register_forward_pre_hook(pre, with_kwargs=True))
            self.hooks.append(blk.gate.register_forward_hook(post))
        self.checked = self.mismatch = 0

    def route(self, batch, seq):
        """ids, weights: [batch, seq, layers, k]."""
        all_ids, all_w = [], []
        for idx, blk in self.blocks:
            x = self.inputs[idx].reshape(-1, self.inputs[idx].shape[-1]).float()
            probs = F.softmax(F.linear(x, blk.gate.weight.float()), dim=-1)
            w, ids = torch.topk(probs, self.top_k, dim=-1)
            if self.renorm:
                w = w / w.sum(-1, keepdim=True)
            self._cross_check(idx, ids)
            all_ids.append(ids.reshape(batch, seq, self.top_k))
            all_w.append(w.reshape(batch, seq, self.top_k))
        self.inputs.clear()
        self.gate_out.clear()
        return torch.stack(all_ids, 2).cpu(), torch.stack(all_w, 2).cpu()

    def _cross_check(self, idx, ids):
        """Where the router module itself returns top-k ids, count disagreements with ours."""
        out = self.gate_out.get(idx)
        for item in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(item) and not item.is_floating_point() and item.shape[-1] == self.top_k:
                theirs = item.reshape(ids.shape)
                self.checked += ids.shape[0]
                self.mismatch += int((theirs != ids).any(-1).sum())

    def close(self):
        for h in self.hooks:
            h.remove()


def _line(meta, rid, phase, ids, w, token_ids):
    return json.dumps(dict(meta, request_id=rid, phase=phase, tokens=ids.tolist(),
                           gate_weights=[[[round(float(v), 3) for v in k] for k in layer] for layer in w],
                           token_ids=token_ids), separators=(",", ":"))


@torch.no_grad()
def record(model, tok, data, args, device):
    prompts = pick_prompts(data, args.trace_prompts)
    router = Router(model)
    cfg = model.config
    meta = dict(model=f"moex {args.preset}", num_layers=len(router.blocks),
                num_experts=getattr(cfg, "num_local_experts", None) or cfg.num_experts, top_k=router.top_k,
                source=f"moex tools/train/trace_record.py (transformers {transformers.__version__}, float32)",
                dataset="Brown corpus held-out paragraphs", layer_ids=[i for i, _ in router.blocks])
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][1]))
    lines = {}
    for pos in range(0, len(order), BATCH):
        group = order[pos:pos + BATCH]
        width = min(len(prompts[i][1]) for i in group)
        ids = torch.tensor([prompts[i][1][:width] for i in group], device=device)
        out = model(input_ids=ids, use_cache=True)
        p_ids, p_w = router.route(len(group), width)
        nxt = out.logits[:, -1].argmax(-1)
        past = out.past_key_values
        dec_ids, dec_w, dec_tok = [], [], []
        for _ in range(DECODE_LEN):
            dec_tok.append(nxt.tolist())
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            d_ids, d_w = router.route(len(group), 1)
            dec_ids.append(d_ids[:, 0])
            dec_w.append(d_w[:, 0])
            nxt = out.logits[:, -1].argmax(-1)
        dec_ids, dec_w = torch.stack(dec_ids, 1), torch.stack(dec_w, 1)
        for row, i in enumerate(group):
            rid = prompts[i][0]
            lines[i] = (_line(meta, rid, "prefill", p_ids[row], p_w[row], ids[row].tolist()),
                        _line(meta, rid, "decode", dec_ids[row], dec_w[row], [t[row] for t in dec_tok]))
    router.close()
    cap = int(args.trace_max_mb * 1e6)
    written = requests = tokens = 0
    with gzip.open(args.traces, "wt", compresslevel=9) as f:
        for i in range(len(prompts)):  # corpus order, not batch order
            size = sum(len(s) + 1 for s in lines[i])
            if written + size > cap:
                break
            for s in lines[i]:
                f.write(s + "\n")
            written += size
            requests += 1
            tokens += len(json.loads(lines[i][0])["tokens"]) + DECODE_LEN
    info = dict(prompts=requests, tokens=tokens, bytes=written, router_checked=router.checked,
                router_mismatch=router.mismatch, file=args.traces)
    log("traces", json.dumps(info))
    return info
