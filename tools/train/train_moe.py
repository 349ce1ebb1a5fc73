#!/usr/bin/env python3
"""Trains one MoE preset (common.PRESETS) on the corpus for a wall-clock budget, on one GPU.

bf16 autocast over fp32 weights, AdamW, warmup + cosine schedule over the time budget, router
load-balancing loss (output_router_logits, router_aux_loss_coef), dropout hooks, held-out evaluation
every few seconds; the best held-out checkpoint is the one saved (Hugging Face layout, bf16).
Then: held-out perplexity vs uniform and unigram baselines, sample continuations, reference.json, traces.
Usage: train_moe.py --preset NAME --corpus brown.jsonl --tokenizer DIR --out DIR --budget-s 300
"""

import argparse
import json
import math
import os
import shutil
import time
import traceback

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import export
import hf_models
import trace_record
from common import AUX_LOSS_COEF, BOS_ID, EOS_ID, PRESETS, encode_paragraphs, load_docs, log, token_stream, write_json

EVAL_EVERY_S = 15.0


class Data:
    def __init__(self, tok, corpus, seq, device):
        train_docs, held_docs = load_docs(corpus)
        self.held_docs = held_docs
        self.held_paras = encode_paragraphs(tok, held_docs)
        stream, starts = token_stream(encode_paragraphs(tok, train_docs))
        self.train_tokens = len(stream)
        self.stream = torch.tensor(stream, dtype=torch.long, device=device)
        span = seq - 1
        self.starts = torch.tensor([s for s in starts if s + span <= len(stream)], dtype=torch.long,
                                   device=device)
        self.offsets = torch.arange(span, device=device)
        self.seq = seq
        self.vocab = tok.get_vocab_size()
        counts = torch.bincount(self.stream, minlength=self.vocab).double()
        self.unigram_logp = torch.log((counts + 0.5) / (counts.sum() + 0.5 * self.vocab))
        # Held-out windows: each document (ending in EOS) cut into consecutive chunks of seq-1 tokens,
        # each fed after a BOS; every held-out token is predicted exactly once.
        windows = []
        for paras in self.held_paras:
            ids = [t for p in paras for t in p] + [EOS_ID]
            for pos in range(0, len(ids), span):
                windows.append(ids[pos:pos + span])
        self.held_windows = windows
        self.held_tokens = sum(len(w) for w in windows)

    def batch(self, batch_size, gen):
        pick = self.starts[torch.randint(len(self.starts), (batch_size,), device=self.starts.device,
                                         generator=gen)]
        body = self.stream[pick[:, None] + self.offsets[None, :]]
        bos = torch.full((batch_size, 1), BOS_ID, dtype=torch.long, device=body.device)
        return torch.cat([bos, body], dim=1)


@torch.no_grad()
def evaluate(model, data, device, batch_size=32):
    """Mean held-out NLL (nats/token) of the model and of the train-fitted unigram, same targets."""
    was_training = model.training
    model.eval()
    nll, uni, n = 0.0, 0.0, 0
    windows = data.held_windows
    for pos in range(0, len(windows), batch_size):
        chunk = windows[pos:pos + batch_size]
        width = 1 + max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), EOS_ID, dtype=torch.long)
        tgt = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, w in enumerate(chunk):
            ids[row, 0] = BOS_ID
            ids[row, 1:1 + len(w)] = torch.tensor(w)
            tgt[row, :len(w)] = torch.tensor(w)
        ids, tgt = ids.to(device), tgt.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                     ignore_index=-100, reduction="sum"))
        mask = tgt >= 0
        uni += float(-data.unigram_logp[tgt[mask]].sum())
        n += int(mask.sum())
    model.train(was_training)
    return nll / n, uni / n, n


def lr_at(frac, peak, warmup=0.03, floor=0.05):
    if frac < warmup:
        return peak * frac / warmup
    t = min(1.0, (frac - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(args, p, data, device):
    cfg = hf_models.make_config(p, data.vocab)
    cfg.router_aux_loss_coef = p.get("aux", AUX_LOSS_COEF)
    torch.manual_seed(args.seed)
    model, impl = hf_models.build_model(cfg, device)
    log(args.preset, f"experts implementation: {impl}; parameters {hf_models.count_params(model) / 1e6:.2f} M")
    hf_models.add_dropout(model, p["dropout"])
    decay = [q for q in model.parameters() if q.ndim >= 2]
    no_decay = [q for q in model.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=p["lr"], betas=(0.9, 0.95), eps=1e-8, fused=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    model.train()
    best = dict(nll=float("inf"), step=0, state=None)
    history = []
    t0 = time.time()
    last_eval = t0
    step, tokens = 0, 0
    while True:
        elapsed = time.time() - t0
        frac = elapsed / args.budget_s
        if frac >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(frac, p["lr"])
        ids = data.batch(p["batch"], gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        if time.time() - last_eval >= EVAL_EVERY_S or step == 50:
            nll, uni, _ = evaluate(model, data, device)
            aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else float("nan")
            rec = dict(step=step, s=round(time.time() - t0, 1), epochs=round(tokens / data.train_tokens, 2),
                       train_loss=round(float(out.loss), 4), aux=round(aux, 4), heldout_nll=round(nll, 4),
                       heldout_ppl=round(math.exp(nll), 2), lr=opt.param_groups[0]["lr"])
            history.append(rec)
            log(args.preset, json.dumps(rec))
            if nll < best["nll"]:
                best = dict(nll=nll, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
            last_eval = time.time()
    nll, _, _ = evaluate(model, data, device)
    if nll < best["nll"]:
        best = dict(nll=nll, step=step, state=None)
    elif best["state"] is not None:
        model.load_state_dict(best["state"])
    log(args.preset, f"done: {step} steps, {tokens / 1e6:.1f} M tokens ({tokens / data.train_tokens:.1f} epochs) "
                     f"in {time.time() - t0:.0f} s; best held-out nll {best['nll']:.4f} at step {best['step']}")
    stats = dict(steps=step, tokens=tokens, epochs=tokens / data.train_tokens, train_s=time.time() - t0,
                 best_step=best["step"], experts_implementation=impl, history=history)
    return model, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json + tokenizer_config.json")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--report", required=True, help="train_report.json to write")
    ap.add_argument("--traces", default=None, help="write expert traces (jsonl.gz) here")
    ap.add_argument("--trace-prompts", type=int, default=300)
    ap.add_argument("--trace-max-mb", type=float, default=40.0)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # evaluation and traces run the model in float32
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    data = Data(tok, args.corpus, p["seq"], device)
    log(args.preset, f"train tokens {data.train_tokens}, held-out tokens {data.held_tokens}, "
                     f"{len(data.starts)} paragraph starts, vocab {data.vocab}")
    model, stats = train(args, p, data, device)

    shutil.rmtree(args.out, ignore_errors=True)
    report = dict(preset=args.preset, params=p, train=stats)
    export.save_model(model, args.out, args.tokenizer)
    report["files"] = {fn: os.path.getsize(os.path.join(args.out, fn)) for fn in sorted(os.listdir(args.out))}
    del model
    torch.cuda.empty_cache()

    # Everything below reads the checkpoint back as written (bf16 weights, computed in fp32).
    loaded = hf_models.load_model(args.out, device)
    try:
        nll, uni, n = evaluate(loaded, data, device)
        report["heldout"] = dict(tokens=n, nll=nll, ppl=math.exp(nll), unigram_ppl=math.exp(uni),
                                 uniform_ppl=data.vocab, documents=len(data.held_docs))
        log(args.preset, f"saved checkpoint: held-out ppl {math.exp(nll):.2f}, unigram {math.exp(uni):.2f}, "
                         f"uniform {data.vocab}")
    except Exception:  # noqa: BLE001 - later steps still run
        report["heldout_error"] = traceback.format_exc()
        log(args.preset, report["heldout_error"])
    for name, fn in (("samples", lambda: export.samples(loaded, tok, device)),
                     ("reference", lambda: export.write_reference(  # on the CPU: exact float32
                         hf_models.load_model(args.out, "cpu"), tok, args.out,
                         "default" if args.preset.startswith("default") else args.preset)),
                     ("traces", lambda: trace_record.record(loaded, tok, data, args, device))):
        if name == "traces" and not args.traces:
            continue
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001
            report[name + "_error"] = traceback.format_exc()
            log(args.preset, report[name + "_error"])
    write_json(args.report, report)
    log(args.preset, "finished")


if __name__ == "__main__":
    main()
