#!/usr/bin/env python3
"""How well a linear model of expert ids guesses the next layer's experts on a routing trace.

For each layer l >= 1 and each expert e, a logistic regression over the features a layer-ahead predictor can
see (the same token's experts at up to 8 earlier layers, and the previous token's experts at layers l and
l + 1: what moex's `bayes` predictor uses) scores whether e is chosen at l; its top-k scores are the guess.
Reported: the recall of those top-k guesses (the share of chosen experts guessed), scored

  - in-sample (`--mode in-sample`): trained and scored on the same tokens, an optimistic bound for this
    feature set (the model can memorise a small trace);
  - leave-one-request-out (`--mode loo`, default): trained on the other requests, scored on the held-out one,
    which is what a predictor that learned from earlier requests could do.

Where this recall stays below what a target hit rate needs (bench/RESULTS.md: 0.80 at half of Mixtral-8x7B's
experts needs about 0.63 next-layer recall with ideal prefetch), no predictor from ids alone is likely to get
there. Pure Python (no numpy): a 577-token trace of 32 layers takes a minute or two.

  python3 tools/trace_linear_recall.py ../shared/traces/mixtral-8x7b-speculative-moe/trace.jsonl --mode loo
"""
import argparse
import json
import math
import random
import sys


def load(path):
    try:
        with open(path) as f:
            reqs = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        sys.exit(f"trace_linear_recall: cannot read {path}: {e}")
    if not reqs or any(k not in reqs[0] for k in ("num_layers", "num_experts", "top_k", "tokens")):
        sys.exit(f"trace_linear_recall: {path} is not a JSONL routing trace (num_layers, num_experts, top_k, tokens)")
    return reqs


def features(tokens, weights, t, layer, num_layers):
    """weights: the trace's gate_weights (the same token's earlier layers take them as values), or None (1.0)."""
    f = {}
    for back in range(1, 9):
        if layer - back < 0:
            break
        for i, e in enumerate(tokens[t][layer - back]):
            f[(back, e)] = weights[t][layer - back][i] if weights else 1.0
    if t > 0:
        for ahead in (0, 1):
            if layer + ahead < num_layers:
                for e in tokens[t - 1][layer + ahead]:
                    f[("prev", ahead, e)] = 1.0
    return f


def train(examples, num_experts, epochs, seed):
    w = [dict() for _ in range(num_experts)]
    b = [0.0] * num_experts
    order = list(examples)
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        for f, chosen in order:
            for e in range(num_experts):
                z = b[e] + sum(w[e].get(k, 0.0) * v for k, v in f.items())
                g = (1.0 if e in chosen else 0.0) - 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))
                b[e] += 0.1 * g
                for k, v in f.items():
                    w[e][k] = w[e].get(k, 0.0) + 0.1 * (g * v - 1e-4 * w[e].get(k, 0.0))
    return w, b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="JSONL routing trace (../shared/traces/README.md's format)")
    ap.add_argument("--mode", choices=["loo", "in-sample"], default="loo")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--guesses", type=int, default=0, help="guesses per layer (0: the trace's top_k)")
    ap.add_argument("--gate-weights", action="store_true",
                    help="the same token's earlier experts weighted by their gate weights (the trace must have them)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    reqs = load(args.trace)
    num_layers, num_experts = reqs[0]["num_layers"], reqs[0]["num_experts"]
    k = args.guesses or reqs[0]["top_k"]
    if args.mode == "loo" and len(reqs) < 2:
        sys.exit("trace_linear_recall: --mode loo needs at least two requests")
    if args.gate_weights and any("gate_weights" not in req for req in reqs):
        sys.exit("trace_linear_recall: --gate-weights: the trace has no gate_weights")
    data = {layer: [] for layer in range(1, num_layers)}
    for r, req in enumerate(reqs):
        weights = req["gate_weights"] if args.gate_weights else None
        for t in range(len(req["tokens"])):
            for layer in range(1, num_layers):
                f = features(req["tokens"], weights, t, layer, num_layers)
                data[layer].append((r, f, set(req["tokens"][t][layer])))
    held_out = range(len(reqs)) if args.mode == "loo" else [None]
    hits = total = 0
    for held in held_out:
        for layer in range(1, num_layers):
            train_set = [(f, c) for r, f, c in data[layer] if r != held]
            test_set = [(f, c) for r, f, c in data[layer] if held is None or r == held]
            w, b = train(train_set, num_experts, args.epochs, seed=layer)
            for f, chosen in test_set:
                score = [b[e] + sum(w[e].get(key, 0.0) * v for key, v in f.items()) for e in range(num_experts)]
                guess = sorted(range(num_experts), key=lambda e: -score[e])[:k]
                hits += len(set(guess) & chosen)
                total += len(chosen)
    recall = hits / total if total else 0.0
    if args.json:
        print(json.dumps({"mode": args.mode, "guesses": k, "gate_weights": args.gate_weights, "recall": recall,
                          "chosen": total}))
    else:
        what = " (gate-weighted)" if args.gate_weights else ""
        print(f"{args.mode}{what}: next-layer top-{k} recall {recall:.3f} ({hits} of {total} chosen experts)")


if __name__ == "__main__":
    main()
