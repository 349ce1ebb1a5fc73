#!/usr/bin/env python3
# Reads the CSV that a moex CUDA run writes with MOEX_CUDA_TIMELINE=FILE (spans of expert copies, expert compute
# attention, routing and read-backs, src/moex/backend/cuda/timeline.h) and prints, per forward (split at the
# logits read-back, the last of a forward): its time, how long the link copied, how long the device computed
# experts, both at once, and the link's idle gaps (start within the forward, length; ms), then the compute stream's
# time per kind of span and what no span covers (small kernels, idle). With a third argument
# N it also lists forward N's spans in start order.
# Usage: tools/cuda_timeline.py FILE VOCAB [N]
import csv, signal, sys

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # piped into head: stop quietly
if len(sys.argv) not in (3, 4):
    sys.exit("usage: tools/cuda_timeline.py TIMELINE.csv VOCAB_SIZE [FORWARD]")
path, vocab = sys.argv[1], int(sys.argv[2])
listed = int(sys.argv[3]) if len(sys.argv) == 4 else -1
rows = [(r['kind'], float(r['start_ms']), float(r['end_ms']), int(r['bytes'])) for r in csv.DictReader(open(path))]
rows.sort(key=lambda r: r[1])
ends = [r[2] for r in rows if r[0] == 'readback' and r[3] == vocab * 4]
def union(spans):
    spans = sorted(spans); out = []
    for a, b in spans:
        if out and a <= out[-1][1]: out[-1][1] = max(out[-1][1], b)
        else: out.append([a, b])
    return out
def total(u): return sum(b - a for a, b in u)
def inter(u, v):
    i = j = 0; t = 0
    while i < len(u) and j < len(v):
        a = max(u[i][0], v[j][0]); b = min(u[i][1], v[j][1])
        if b > a: t += b - a
        if u[i][1] < v[j][1]: i += 1
        else: j += 1
    return t
prev = rows[0][1] if rows else 0
for idx, end in enumerate(ends):
    win = [r for r in rows if r[1] >= prev and r[2] <= end]
    copies = union([(r[1], r[2]) for r in win if r[0] == 'copy'])
    experts = union([(r[1], r[2]) for r in win if r[0] == 'experts'])
    reads = [r for r in win if r[0] == 'readback']
    first_copy = copies[0][0] if copies else end
    gaps = [(a2 - prev, a2 - b1) for (a1, b1), (a2, b2) in zip(copies, copies[1:]) if a2 - b1 > 0.5]
    gb = sum(r[3] for r in win if r[0] == 'copy') / 1e9
    print(f"prompt {idx}: {end - prev:.1f} ms, link busy {total(copies):.1f} ms ({gb:.2f} GB, first copy at "
          f"{first_copy - prev:.1f}), experts busy {total(experts):.1f} ms, both {inter(copies, experts):.1f} ms, "
          f"{len([r for r in win if r[0] == 'experts'])} expert launches, read-backs at " +
          ' '.join(f"{r[1] - prev:.1f}" for r in reads))
    if gaps: print("   link idle > 0.5 ms (at, for): " + ' '.join(f"({a:.1f},{g:.1f})" for a, g in gaps[:24]))
    # The compute stream by kind; what no span covers is small kernels (norms, RoPE, casts) and idle time.
    kinds = sorted({r[0] for r in win if r[0] != 'copy'})
    covered = union([(r[1], r[2]) for r in win if r[0] != 'copy'])
    print("   compute stream: " + ', '.join(f"{k} {total(union([(r[1], r[2]) for r in win if r[0] == k])):.1f} ms" for k in kinds) +
          f"; outside every span {end - prev - total(covered):.1f} ms")
    if idx == listed:
        for kind, a, b, size in win:
            print(f"   {kind:9s} {a - prev:8.2f} {b - prev:8.2f}  ({b - a:6.2f} ms, {size})")
    prev = end
