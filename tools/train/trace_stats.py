#!/usr/bin/env python3
"""Routing statistics of expert traces in the ../shared/traces format (.jsonl or .jsonl.gz).

Standard library only. The definitions follow ../shared/traces/README.md so the numbers sit next to the
real Mixtral-8x7B and FLAME-MoE ones:
  skew         max expert count / mean expert count at a layer
  P(reuse)     token t at layer l selects >= 1 expert that token t-1 (same line) selected at layer l
  reuse frac   mean |S_t & S_t-1| / k
  LRU/LFU/Belady  per-layer cache of C experts (25% and 50% of E), lines replayed back to back, cold
               misses counted, demand loading, the current token's k experts co-resident; hits/(tokens*k)
and one cross-layer figure, for next-layer prediction:
  next-layer hit   the k experts of layer l+1 predicted from the experts of layer l of the same token
               (co-occurrence counts fitted on even lines, scored on odd lines): P(>= 1 right) and recall,
               against predicting layer l+1's k most used experts, and against uniform random.
Usage: trace_stats.py TRACE [--json OUT] [--max-lines N]
"""

import argparse
import bisect
import collections
import gzip
import json
import math
import sys


def read_trace(path, max_lines=None):
    opener = gzip.open if path.endswith(".gz") else open
    lines = []
    with opener(path, "rt") as f:
        for line in f:
            if line.strip():
                lines.append(json.loads(line))
                if max_lines and len(lines) >= max_lines:
                    break
    if not lines:
        sys.exit(f"{path}: no requests")
    return lines


def p_overlap_random(n, k):
    """P(two uniform random k-subsets of n share >= 1 element)."""
    return 1.0 - math.comb(n - k, k) / math.comb(n, k)


def simulate(stream, cap, policy):
    """Hit rate of one layer's cache over a stream of expert sets."""
    resident = collections.OrderedDict()  # expert -> None, least recently used first
    counts = collections.Counter()
    uses = collections.defaultdict(list)
    if policy == "belady":
        for t, s in enumerate(stream):
            for e in s:
                uses[e].append(t)
    hits = total = 0
    for t, s in enumerate(stream):
        for e in s:
            counts[e] += 1
            total += 1
            if e in resident:
                hits += 1
                resident.move_to_end(e)
                continue
            if len(resident) >= cap:
                victims = [r for r in resident if r not in s]
                if policy == "lru":
                    victim = victims[0]
                elif policy == "lfu":
                    victim = min(victims, key=lambda r: counts[r])  # ties: least recently used
                else:
                    def next_use(r):
                        pos = uses[r]
                        i = bisect.bisect_right(pos, t)
                        return pos[i] if i < len(pos) else math.inf
                    victim = max(victims, key=next_use)
                del resident[victim]
            resident[e] = None
    return hits / total if total else float("nan")


def layer_streams(lines, num_layers):
    """Per layer, the expert sets of all tokens with the line boundaries (line index per token)."""
    streams = [[] for _ in range(num_layers)]
    owner = []
    for li, req in enumerate(lines):
        for tok in req["tokens"]:
            owner.append(li)
            for layer in range(num_layers):
                streams[layer].append(tok[layer])
    return streams, owner


def per_layer(stream, owner, num_experts, top_k, caches):
    load = collections.Counter(e for s in stream for e in s)
    mean = len(stream) * top_k / num_experts
    reuse = reuse_frac = pairs = 0
    for t in range(1, len(stream)):
        if owner[t] != owner[t - 1]:
            continue
        shared = len(set(stream[t]) & set(stream[t - 1]))
        pairs += 1
        reuse += shared > 0
        reuse_frac += shared / top_k
    row = dict(skew=max(load.values()) / mean, unused=num_experts - len(load),
               p_reuse=reuse / pairs if pairs else float("nan"),
               reuse_frac=reuse_frac / pairs if pairs else float("nan"))
    for label, cap in caches.items():
        for policy in ("lru", "lfu", "belady"):
            row[f"{policy}_{label}"] = simulate(stream, cap, policy)
    return row


def next_layer(streams, owner, num_experts, top_k):
    """Cross-layer prediction l -> l+1 per layer pair."""
    rows = []
    for layer in range(len(streams) - 1):
        cur, nxt = streams[layer], streams[layer + 1]
        co = [[0] * num_experts for _ in range(num_experts)]
        freq = [0] * num_experts
        for t in range(len(cur)):
            if owner[t] % 2 == 0:
                for b in nxt[t]:
                    freq[b] += 1
                    for a in cur[t]:
                        co[a][b] += 1
        top_freq = set(sorted(range(num_experts), key=lambda b: -freq[b])[:top_k])
        n = hit = rec = hit_f = rec_f = 0
        for t in range(len(cur)):
            if owner[t] % 2 == 1:
                score = [sum(co[a][b] for a in cur[t]) for b in range(num_experts)]
                pred = set(sorted(range(num_experts), key=lambda b: -score[b])[:top_k])
                truth = set(nxt[t])
                n += 1
                hit += bool(pred & truth)
                rec += len(pred & truth) / top_k
                hit_f += bool(top_freq & truth)
                rec_f += len(top_freq & truth) / top_k
        if n:
            rows.append(dict(layer=layer, p_hit=hit / n, recall=rec / n, p_hit_freq=hit_f / n,
                             recall_freq=rec_f / n))
    return rows


def summarize(lines):
    first = lines[0]
    num_layers, num_experts, top_k = first["num_layers"], first["num_experts"], first["top_k"]
    caches = {"25%": max(top_k, num_experts // 4), "50%": max(top_k, num_experts // 2)}
    streams, owner = layer_streams(lines, num_layers)
    layers = [dict(layer=l, **per_layer(streams[l], owner, num_experts, top_k, caches)) for l in range(num_layers)]
    cross = next_layer(streams, owner, num_experts, top_k)
    summary = dict(model=first.get("model"), lines=len(lines), tokens=len(owner), num_layers=num_layers,
                   num_experts=num_experts, top_k=top_k, cache_sizes=caches,
                   random_p_reuse=p_overlap_random(num_experts, top_k), random_reuse_frac=top_k / num_experts,
                   phases=dict(collections.Counter(r.get("phase", "?") for r in lines)))
    for key in layers[0]:
        if key != "layer":
            vals = [r[key] for r in layers]
            summary[key] = dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals))
    for key in ("p_hit", "recall", "p_hit_freq", "recall_freq"):
        vals = [r[key] for r in cross]
        if vals:
            summary["next_layer_" + key] = dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals))
    return dict(summary=summary, per_layer=layers, next_layer=cross)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--json", default=None)
    ap.add_argument("--max-lines", type=int, default=None)
    args = ap.parse_args()
    res = summarize(read_trace(args.trace, args.max_lines))
    s = res["summary"]
    print(f"{s['model']}: {s['lines']} lines, {s['tokens']} tokens, {s['num_layers']} x {s['num_experts']}, "
          f"top-{s['top_k']}, caches {s['cache_sizes']}")
    for key in ("skew", "unused", "p_reuse", "reuse_frac", "lru_25%", "lfu_25%", "belady_25%", "lru_50%",
                "lfu_50%", "belady_50%", "next_layer_p_hit", "next_layer_recall", "next_layer_p_hit_freq",
                "next_layer_recall_freq"):
        if key in s:
            v = s[key]
            print(f"  {key:24s} {v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})")
    print(f"  random P(reuse) {s['random_p_reuse']:.3f}, random reuse frac {s['random_reuse_frac']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
