#!/usr/bin/env python3
"""Where a decode step's time goes, from a kernel timeline (tools/kernel_trace/kernel_trace.cc).

    python3 tools/kernel_trace.py trace.csv [--json] [--by-position [--bucket N] [--run-gap-us US]]

Kernels of one CUDA graph launch (one recorded decode step) share a correlation id. Within a step the kernels
run in stream order, each ending after the one before (programmatic dependent launch lets a kernel start early,
never finish early), so the step's critical path is the chain of end times: a kernel's share is its end minus
the previous kernel's end. Kernels with a large share are the ones to fuse, overlap or speed up; a kernel whose
duration is long but whose share is small was waiting for its predecessor. Only graph launches are counted
(steps that ran eagerly, prompts and setup are left out); the time between one step's last kernel and the next
step's first is the host's part (read-back, sampling, the next launch); its median is reported, since the gaps
between repetitions of a benchmark hold a prompt's prefill.

--by-position splits the steps into runs (graph launches back to back: a gap of more than --run-gap-us, a
prompt's prefill, starts a new run) and reports, per bucket of --bucket positions in the run, the median step and
each kernel's median share per step. At decode the position is the context's growth, so costs that grow with the
number of keys show there (the attention's rounds of keys) and nowhere in the averaged table."""
import argparse
import collections
import csv
import gzip
import json
import re
import statistics
import sys


def short(name):
    name = re.sub(r"moex::cuda::(\(anonymous namespace\)::)?", "", name)
    return name.replace("(anonymous namespace)::", "")


def load(path):
    """The trace's rows; a .gz file (what device_cuda.sh trace leaves) is read through gzip."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"kernel_trace: cannot read {path}: {e.strerror or e}")
    except (UnicodeDecodeError, csv.Error) as e:
        sys.exit(f"kernel_trace: {path} is not a CSV kernel trace ({e})")
    need = {"start_ns", "end_ns", "correlation", "graph_id", "name"}
    if rows and not need <= rows[0].keys():
        sys.exit(f"kernel_trace: {path} is not a kernel trace (columns {sorted(need)} expected)")
    return rows


Step = collections.namedtuple("Step", "start end kernels")  # kernels: (name, share_ns, duration_ns) by end


def graph_steps(rows):
    """The graph launches in time order, each a Step: its first start, its last end, and every kernel's share of
    its critical path (end minus the previous kernel's end, the first kernel's from the step's start)."""
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
    result = []
    for kernels in steps.values():
        kernels.sort(key=lambda k: k[1])
        start = prev = min(k[0] for k in kernels)
        shares = []
        for k_start, k_end, name, _ in kernels:
            shares.append((name, k_end - prev, k_end - k_start))
            prev = k_end
        result.append(Step(start, kernels[-1][1], shares))
    return sorted(result, key=lambda step: step.start)


def analyse(rows):
    share = collections.defaultdict(float)
    duration = collections.defaultdict(float)
    launches = collections.Counter()
    spans, gaps = [], []
    previous_end = None
    for step in graph_steps(rows):
        if previous_end is not None:
            gaps.append(step.start - previous_end)
        for name, kernel_share, kernel_duration in step.kernels:
            share[name] += kernel_share
            duration[name] += kernel_duration
            launches[name] += 1
        spans.append(step.end - step.start)
        previous_end = step.end
    n = len(spans)
    table = [{"kernel": name, "launches_per_step": launches[name] / n, "share_us_per_step": share[name] / n / 1e3,
              "duration_us_per_launch": duration[name] / launches[name] / 1e3} for name in share]
    table.sort(key=lambda e: -e["share_us_per_step"])
    step_us = sum(spans) / n / 1e3
    # The median: the gaps between repetitions hold a prompt's prefill and setup.
    between = sorted(gaps)[len(gaps) // 2] / 1e3 if gaps else 0.0
    return {"steps": n, "step_us": step_us, "between_steps_us": between, "kernels": table}


def by_position(rows, bucket, run_gap_us):
    """Median step and median per-step share of each kernel, per bucket of positions within runs of steps."""
    if bucket < 1 or run_gap_us < 0:
        sys.exit("kernel_trace: --bucket must be at least 1 and --run-gap-us not negative")
    buckets = collections.defaultdict(lambda: {"spans": [], "shares": collections.defaultdict(list)})
    names = collections.Counter()
    position, previous_end, runs = 0, None, 0
    for step in graph_steps(rows):
        if previous_end is None or step.start - previous_end > run_gap_us * 1e3:
            position, runs = 0, runs + 1
        b = buckets[position // bucket]
        b["spans"].append(step.end - step.start)
        per_step = collections.defaultdict(float)  # a kernel launched several times a step: its shares summed
        for name, kernel_share, _ in step.kernels:
            per_step[name] += kernel_share
        for name, value in per_step.items():
            b["shares"][name].append(value)
            names[name] += value
        position += 1
        previous_end = step.end
    kernels = [name for name, _ in names.most_common()]
    table = []
    for index in sorted(buckets):
        b = buckets[index]
        table.append({"positions": [index * bucket, index * bucket + bucket - 1], "steps": len(b["spans"]),
                      "step_us": statistics.median(b["spans"]) / 1e3,
                      "share_us": {k: statistics.median(b["shares"][k]) / 1e3 for k in kernels if b["shares"][k]}})
    return {"runs": runs, "bucket": bucket, "kernels": kernels, "buckets": table}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--top", type=int, default=25, help="kernels to list (default 25)")
    ap.add_argument("--by-position", action="store_true",
                    help="per position of a step in its run of back-to-back steps (the context's growth at decode)")
    ap.add_argument("--bucket", type=int, default=8, help="positions per row with --by-position (default 8)")
    ap.add_argument("--run-gap-us", type=float, default=20.0,
                    help="a longer gap between two steps starts a new run (default 20 us)")
    a = ap.parse_args()
    if a.by_position:
        result = by_position(load(a.trace), a.bucket, a.run_gap_us)
        if a.json:
            print(json.dumps(result))
            return
        shown = result["kernels"][:a.top]
        print(f"{result['runs']} runs of back-to-back graph steps; median us per step, then each kernel's median "
              f"critical-path share per step")
        print("| positions | steps | step us | " + " | ".join(k[:40] for k in shown) + " |")
        print("|---" * (3 + len(shown)) + "|")
        for b in result["buckets"]:
            cells = [f"{b['share_us'][k]:.1f}" if k in b["share_us"] else "-" for k in shown]
            print(f"| {b['positions'][0]}-{b['positions'][1]} | {b['steps']} | {b['step_us']:.1f} | "
                  + " | ".join(cells) + " |")
        return
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
