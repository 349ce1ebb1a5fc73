#!/usr/bin/env python3
"""Where a decode step's time goes, from a kernel timeline (tools/kernel_trace/kernel_trace.cc).

    python3 tools/kernel_trace.py trace.csv [--json]

Kernels of one CUDA graph launch (one recorded decode step) share a correlation id. Within a step the kernels
run in stream order, each ending after the one before (programmatic dependent launch lets a kernel start early,
never finish early), so the step's critical path is the chain of end times: a kernel's share is its end minus
the previous kernel's end. Kernels with a large share are the ones to fuse, overlap or speed up; a kernel whose
duration is long but whose share is small was waiting for its predecessor. Only graph launches are counted
(steps that ran eagerly, prompts and setup are left out); the time between one step's last kernel and the next
step's first is the host's part (read-back, sampling, the next launch); its median is reported, since the gaps
between repetitions of a benchmark hold a prompt's prefill."""
import argparse
import collections
import csv
import json
import re
import sys


def short(name):
    name = re.sub(r"moex::cuda::(\(anonymous namespace\)::)?", "", name)
    return name.replace("(anonymous namespace)::", "")


def load(path):
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"kernel_trace: cannot read {path}: {e.strerror}")
    need = {"start_ns", "end_ns", "correlation", "graph_id", "name"}
    if rows and not need <= rows[0].keys():
        sys.exit(f"kernel_trace: {path} is not a kernel trace (columns {sorted(need)} expected)")
    return rows


def analyse(rows):
    steps = collections.defaultdict(list)
    for line, r in enumerate(rows, start=2):
        try:
            if int(r["graph_id"]) == 0:
                continue
            steps[int(r["correlation"])].append(
                (int(r["start_ns"]), int(r["end_ns"]), short(r["name"] or "?"), int(r.get("grid", 0) or 0)))
        except (TypeError, ValueError):
            sys.exit(f"kernel_trace: line {line} is not a kernel record (a number expected): {dict(r)}")
    if not steps:
        sys.exit("kernel_trace: no kernels from CUDA graph launches in the trace (decode steps run eagerly?)")
    share = collections.defaultdict(float)
    duration = collections.defaultdict(float)
    launches = collections.Counter()
    spans, gaps = [], []
    previous_end = None
    for corr in sorted(steps, key=lambda c: min(k[0] for k in steps[c])):
        kernels = sorted(steps[corr], key=lambda k: k[1])
        first_start = min(k[0] for k in kernels)
        if previous_end is not None:
            gaps.append(first_start - previous_end)
        prev = first_start
        for start, end, name, _ in kernels:
            share[name] += end - prev
            duration[name] += end - start
            launches[name] += 1
            prev = end
        spans.append(kernels[-1][1] - first_start)
        previous_end = kernels[-1][1]
    n = len(spans)
    table = [{"kernel": name, "launches_per_step": launches[name] / n, "share_us_per_step": share[name] / n / 1e3,
              "duration_us_per_launch": duration[name] / launches[name] / 1e3} for name in share]
    table.sort(key=lambda e: -e["share_us_per_step"])
    step_us = sum(spans) / n / 1e3
    # The median: the gaps between repetitions hold a prompt's prefill and setup.
    between = sorted(gaps)[len(gaps) // 2] / 1e3 if gaps else 0.0
    return {"steps": n, "step_us": step_us, "between_steps_us": between, "kernels": table}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--top", type=int, default=25, help="kernels to list (default 25)")
    a = ap.parse_args()
    result = analyse(load(a.trace))
    if a.json:
        print(json.dumps(result))
        return
    print(f"{result['steps']} graph steps: {result['step_us']:.1f} us from the first kernel's start to the last's "
          f"end, {result['between_steps_us']:.1f} us between steps (median)")
    print("| kernel | launches / step | critical-path us / step | % | us per launch (start to end) |")
    print("|---|---|---|---|---|")
    for e in result["kernels"][:a.top]:
        print(f"| {e['kernel'][:90]} | {e['launches_per_step']:.0f} | {e['share_us_per_step']:.1f} | "
              f"{100 * e['share_us_per_step'] / result['step_us']:.1f} | {e['duration_us_per_launch']:.2f} |")


if __name__ == "__main__":
    main()
