#!/usr/bin/env python3
"""Where a decode step's time goes, from a kernel timeline (tools/kernel_trace/kernel_trace.cc).

    python3 tools/kernel_trace.py trace.csv [--json] [--by-position [--bucket N] [--run-gap-us US]]
                                            [--by-launch] [--with KERNEL]
                                            [--prompts [--prompt-gap-us US] [--common] [--cut-at KERNEL]]

Kernels of one CUDA graph launch (one recorded decode step) share a correlation id. Within a step the kernels
run in stream order, each ending after the one before (programmatic dependent launch lets a kernel start early,
never finish early), so the step's critical path is the chain of end times: a kernel's share is its end minus
the previous kernel's end. Kernels with a large share are the ones to fuse, overlap or speed up; a kernel whose
duration is long but whose share is small was waiting for its predecessor. Only graph launches are counted
(steps that ran eagerly, prompts and setup are left out); the time between one step's last kernel and the next
step's first is the host's part (read-back, sampling, the next launch); its median is reported, since the gaps
between repetitions of a benchmark hold a prompt's prefill. --with KERNEL keeps the graph steps holding that kernel:
batched steps of 2-32 rows are recorded too, and `--with moe_plan_tokens_kernel` tells them from batch-1 ones.

--prompts reads the kernels launched one by one instead (prefill: graph launches are left out): they are cut into
prompts where no kernel runs for --prompt-gap-us, and for the prompts with the most kernels (a benchmark's
repetitions of its longest prompt) it reports the median prompt, the time no kernel ran, and per kernel and grid
size the launches, the summed duration and the critical-path share per prompt: which kernels a prefill is made
of, and what lies outside the tensor-core ones. With --common it takes the runs of the kernel count most runs have
instead: batched decode steps past 32 rows (not recorded as graphs) outnumber the prompts a benchmark prefills
before them.

--by-launch lists a step's launches in stream order with each one's share, its duration and its lead: how long
before the kernel it follows ended it was already on the GPU. Under programmatic dependent launch a kernel's blocks
start, and do their work before the wait, only where the kernel ahead leaves room on an SM: a small lead after a
kernel that fills the SMs' registers marks a kernel whose pre-wait work is on the critical path.

With --prompts, --by-launch lists the chosen runs' launches in start order instead, with the idle time before each
(no kernel running): where eager launches (batched decode steps) leave the GPU waiting for the host.

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


Step = collections.namedtuple("Step", "start end kernels")  # kernels: Kernel tuples by end
# share_ns: end minus the previous kernel's end; lead_ns: the previous kernel's end minus this one's start (how long
# it was on the GPU before the kernel it follows ended; None for a step's first kernel).
Kernel = collections.namedtuple("Kernel", "name share_ns duration_ns lead_ns grid registers")


def graph_steps(rows, with_kernel=None):
    """The graph launches in time order, each a Step: its first start, its last end, and every kernel's share of
    its critical path (end minus the previous kernel's end, the first kernel's from the step's start). With
    with_kernel, only the launches holding a kernel whose name starts with it (a benchmark records batch-1 and
    batched steps alike: moe_plan_tokens_kernel is in the batched ones only)."""
    steps = collections.defaultdict(list)
    for line, r in enumerate(rows, start=2):
        try:
            if int(r["graph_id"]) == 0:
                continue
            steps[int(r["correlation"])].append(
                (int(r["start_ns"]), int(r["end_ns"]), short(r["name"] or "?"), int(r.get("grid", 0) or 0),
                 int(r.get("registers", 0) or 0)))
        except (TypeError, ValueError):
            sys.exit(f"kernel_trace: line {line} is not a kernel record (a number expected): {dict(r)}")
    if not steps:
        sys.exit("kernel_trace: no kernels from CUDA graph launches in the trace (decode steps run eagerly?)")
    result = []
    for kernels in steps.values():
        kernels.sort(key=lambda k: k[1])
        start = prev = min(k[0] for k in kernels)
        shares = []
        for i, (k_start, k_end, name, grid, registers) in enumerate(kernels):
            shares.append(Kernel(name, k_end - prev, k_end - k_start, prev - k_start if i else None, grid, registers))
            prev = k_end
        if with_kernel and not any(k.name.startswith(with_kernel) for k in shares):
            continue
        result.append(Step(start, kernels[-1][1], shares))
    if not result:
        sys.exit(f"kernel_trace: no CUDA graph launch holds a kernel named {with_kernel}...")
    return sorted(result, key=lambda step: step.start)


def analyse(rows, with_kernel=None):
    share = collections.defaultdict(float)
    duration = collections.defaultdict(float)
    launches = collections.Counter()
    spans, gaps = [], []
    previous_end = None
    for step in graph_steps(rows, with_kernel):
        if previous_end is not None:
            gaps.append(step.start - previous_end)
        for k in step.kernels:
            share[k.name] += k.share_ns
            duration[k.name] += k.duration_ns
            launches[k.name] += 1
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


def by_position(rows, bucket, run_gap_us, with_kernel=None):
    """Median step and median per-step share of each kernel, per bucket of positions within runs of steps."""
    if bucket < 1 or run_gap_us < 0:
        sys.exit("kernel_trace: --bucket must be at least 1 and --run-gap-us not negative")
    buckets = collections.defaultdict(lambda: {"spans": [], "shares": collections.defaultdict(list)})
    names = collections.Counter()
    position, previous_end, runs = 0, None, 0
    for step in graph_steps(rows, with_kernel):
        if previous_end is None or step.start - previous_end > run_gap_us * 1e3:
            position, runs = 0, runs + 1
        b = buckets[position // bucket]
        b["spans"].append(step.end - step.start)
        per_step = collections.defaultdict(float)  # a kernel launched several times a step: its shares summed
        for k in step.kernels:
            per_step[k.name] += k.share_ns
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


def by_launch(rows, with_kernel=None):
    """Per launch of a step, in stream order (the steps with the most common kernel count: one recorded bucket):
    the kernel, its grid and registers, and the medians of its share, its duration and its lead (how long before
    the kernel it follows ended it was already on the GPU). A kernel with a small lead whose predecessor fills the
    SMs could not get its blocks on early: its pre-wait work is on the critical path."""
    steps = graph_steps(rows, with_kernel)
    count = collections.Counter(len(step.kernels) for step in steps).most_common(1)[0][0]
    chosen = [step for step in steps if len(step.kernels) == count]
    table = []
    for i in range(count):
        ks = [step.kernels[i] for step in chosen]
        leads = [k.lead_ns for k in ks if k.lead_ns is not None]
        table.append({"launch": i, "kernel": ks[0].name, "grid": ks[0].grid, "registers": ks[0].registers,
                      "share_us": statistics.median(k.share_ns for k in ks) / 1e3,
                      "duration_us": statistics.median(k.duration_ns for k in ks) / 1e3,
                      "lead_us": statistics.median(leads) / 1e3 if leads else None})
    return {"steps": len(chosen), "kernels_per_step": count, "launches": table}


def eager_prompts(rows, gap_us, cut_at=None):
    """Kernels launched one by one (graph_id 0), cut into prompts at gaps of more than gap_us with no kernel
    running (and, with cut_at, before every kernel whose name starts with it); each prompt a list of (start, end,
    name, grid) by start, and beside the list the time since the previous prompt's last end (None for the
    first)."""
    kernels = []
    for line, r in enumerate(rows, start=2):
        try:
            if int(r["graph_id"]) != 0:
                continue
            kernels.append((int(r["start_ns"]), int(r["end_ns"]), short(r["name"] or "?"), r.get("grid") or "?"))
        except (TypeError, ValueError):
            sys.exit(f"kernel_trace: line {line} is not a kernel record (a number expected): {dict(r)}")
    if not kernels:
        sys.exit("kernel_trace: no kernels launched one by one in the trace (every kernel from a graph launch?)")
    kernels.sort()
    prompts, befores, current, end, before = [], [], [], None, None
    for k in kernels:
        if end is not None and (k[0] - end > gap_us * 1e3 or (cut_at and k[2].startswith(cut_at))):
            prompts.append(current)
            befores.append(before)
            current, before = [], max(0, k[0] - end)
        current.append(k)
        end = k[1] if end is None else max(end, k[1])
    prompts.append(current)
    befores.append(before)
    return list(zip(prompts, befores))


def chosen_prompts(rows, gap_us, common=False, cut_at=None, with_kernel=None):
    """The prompts with the most kernels (common: with the kernel count most prompts have, the larger on a tie),
    among those holding a kernel whose name starts with with_kernel where given; each with the time since the
    previous prompt ended (None for the first)."""
    if gap_us <= 0:
        sys.exit("kernel_trace: --prompt-gap-us must be positive")
    prompts = eager_prompts(rows, gap_us, cut_at)
    if with_kernel:
        prompts = [(p, b) for p, b in prompts if any(k[2].startswith(with_kernel) for k in p)]
        if not prompts:
            sys.exit(f"kernel_trace: no run of eager kernels holds a kernel named {with_kernel}...")
    counts = collections.Counter(len(p) for p, _ in prompts)
    most = max(counts, key=lambda n: (counts[n], n)) if common else max(counts)
    return most, [(p, b) for p, b in prompts if len(p) == most]


def median_before_us(chosen):
    befores = [b for _, b in chosen if b is not None]
    return statistics.median(befores) / 1e3 if befores else None


def walk_prompt(prompt):
    """A prompt's kernels by start, each with the idle time before it (no kernel running since the prompt's start)
    and its share of the prompt's span (the part of it this kernel alone extends); and the prompt's span."""
    start = prev = prompt[0][0]
    walked = []
    for k in prompt:
        k_start, k_end = k[0], k[1]
        walked.append((k, max(0, k_start - prev), max(0, k_end - max(prev, k_start))))
        prev = max(prev, k_end)
    return walked, prev - start


def prompt_kernels(rows, gap_us, common=False, cut_at=None, with_kernel=None):
    """The chosen prompts (chosen_prompts): the median prompt's span, its idle time and the idle time before it,
    and per (kernel, grid) the median launches, summed duration and critical-path share per prompt."""
    most, chosen = chosen_prompts(rows, gap_us, common, cut_at, with_kernel)
    spans, idles = [], []
    per = collections.defaultdict(lambda: {"launches": [], "duration": [], "share": []})
    for p, _ in chosen:
        walked, span = walk_prompt(p)
        stats = collections.defaultdict(lambda: [0, 0, 0])
        for (k_start, k_end, name, grid), _, share in walked:
            s = stats[(name, grid)]
            s[0] += 1
            s[1] += k_end - k_start
            s[2] += share
        spans.append(span)
        idles.append(sum(idle for _, idle, _ in walked))
        for key, (n, duration, share) in stats.items():
            per[key]["launches"].append(n)
            per[key]["duration"].append(duration)
            per[key]["share"].append(share)
    table = [{"kernel": name, "grid": grid, "launches": statistics.median(v["launches"]),
              "duration_us": statistics.median(v["duration"]) / 1e3, "share_us": statistics.median(v["share"]) / 1e3}
             for (name, grid), v in per.items()]
    table.sort(key=lambda e: -e["share_us"])
    return {"prompts": len(chosen), "kernels_per_prompt": most, "prompt_us": statistics.median(spans) / 1e3,
            "idle_us": statistics.median(idles) / 1e3, "before_us": median_before_us(chosen), "kernels": table}


def prompt_launches(rows, gap_us, common=False, cut_at=None, with_kernel=None):
    """Per launch of the chosen prompts (chosen_prompts) in start order: the kernel, its grid, and the medians of
    its duration, its share of the prompt's critical path and the idle time before it started (no kernel running:
    the GPU waited for the host's launch). Batched decode steps run eagerly, so launch-bound stretches show as idle
    time before small kernels."""
    most, chosen = chosen_prompts(rows, gap_us, common, cut_at, with_kernel)
    per = [{"duration": [], "share": [], "idle": []} for _ in range(most)]
    for p, _ in chosen:
        for i, ((k_start, k_end, _, _), idle, share) in enumerate(walk_prompt(p)[0]):
            per[i]["idle"].append(idle)
            per[i]["duration"].append(k_end - k_start)
            per[i]["share"].append(share)
    first = chosen[0][0]
    table = [{"launch": i, "kernel": first[i][2], "grid": first[i][3],
              "duration_us": statistics.median(v["duration"]) / 1e3, "share_us": statistics.median(v["share"]) / 1e3,
              "idle_us": statistics.median(v["idle"]) / 1e3} for i, v in enumerate(per)]
    return {"prompts": len(chosen), "kernels_per_prompt": most, "before_us": median_before_us(chosen),
            "launches": table}


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
    ap.add_argument("--by-launch", action="store_true",
                    help="per launch of a step in stream order: share, duration and how early it started (with "
                         "--prompts: of the chosen runs of eager launches, with the idle time before each)")
    ap.add_argument("--prompts", action="store_true",
                    help="the kernels launched one by one, per prompt (prefill), instead of the graph steps")
    ap.add_argument("--prompt-gap-us", type=float, default=100.0,
                    help="with --prompts: a longer time with no kernel running starts a new prompt (default 100 us)")
    ap.add_argument("--cut-at", metavar="KERNEL",
                    help="with --prompts: also start a new run at every kernel whose name starts with KERNEL (a "
                         "batched decode step's first kernel, e.g. embedding_kernel)")
    ap.add_argument("--with", dest="with_kernel", metavar="KERNEL",
                    help="only the graph steps (with --prompts: the runs) holding a kernel whose name starts with "
                         "KERNEL (e.g. moe_plan_tokens_kernel: batched steps, not batch-1 ones; with --prompts "
                         "argmax_merge: decode steps, not the prompts' prefills)")
    ap.add_argument("--common", action="store_true",
                    help="with --prompts: the runs of the kernel count most runs have, not the most kernels (batched "
                         "decode steps, launched one by one, outnumber a benchmark's prompts)")
    a = ap.parse_args()
    # The view asked for: what it computes, and how its table is printed (--json prints the result instead).
    if a.prompts and a.by_launch:
        compute, table = (lambda rows: prompt_launches(rows, a.prompt_gap_us, a.common, a.cut_at, a.with_kernel)), print_prompt_launches
    elif a.prompts:
        compute, table = (lambda rows: prompt_kernels(rows, a.prompt_gap_us, a.common, a.cut_at, a.with_kernel)), print_prompts
    elif a.by_launch:
        compute, table = (lambda rows: by_launch(rows, a.with_kernel)), print_launches
    elif a.by_position:
        compute, table = (lambda rows: by_position(rows, a.bucket, a.run_gap_us, a.with_kernel)), print_positions
    else:
        compute, table = (lambda rows: analyse(rows, a.with_kernel)), print_steps
    result = compute(load(a.trace))
    if a.json:
        print(json.dumps(result))
    else:
        table(result, a.top)


def before_text(result):
    before = result.get("before_us")
    return "" if before is None else f"; {before:.1f} us from the run before's end to its start (median)"


def print_prompts(result, top):
    print(f"{result['prompts']} prompts of {result['kernels_per_prompt']} kernels: {result['prompt_us']:.1f} us "
          f"from the first kernel's start to the last's end, {result['idle_us']:.1f} us with no kernel running "
          f"(medians){before_text(result)}")
    print("| kernel | grid | launches | us (start to end, summed) | critical-path us | % |")
    print("|---|---|---|---|---|---|")
    for e in result["kernels"][:top]:
        print(f"| {e['kernel'][:80]} | {e['grid']} | {e['launches']:.0f} | {e['duration_us']:.1f} | "
              f"{e['share_us']:.1f} | {100 * e['share_us'] / result['prompt_us']:.1f} |")


def print_prompt_launches(result, top):
    del top  # every launch: the order is the point
    print(f"{result['prompts']} runs of {result['kernels_per_prompt']} kernels launched one by one; medians per "
          f"launch. idle: no kernel running before it started{before_text(result)}")
    print("| launch | kernel | grid | critical-path us | idle us | us (start to end) |")
    print("|---|---|---|---|---|---|")
    for e in result["launches"]:
        print(f"| {e['launch']} | {e['kernel'][:60]} | {e['grid']} | {e['share_us']:.2f} | {e['idle_us']:.2f} | "
              f"{e['duration_us']:.2f} |")


def print_launches(result, top):
    del top  # every launch of the step: the order is the point
    print(f"{result['steps']} graph steps of {result['kernels_per_step']} kernels; medians per launch. lead: how "
          f"long before the kernel it follows ended it was on the GPU")
    print("| launch | kernel | grid | registers | critical-path us | lead us | us (start to end) |")
    print("|---|---|---|---|---|---|---|")
    for e in result["launches"]:
        lead = "-" if e["lead_us"] is None else f"{e['lead_us']:.2f}"
        print(f"| {e['launch']} | {e['kernel'][:60]} | {e['grid']} | {e['registers']} | {e['share_us']:.2f} | "
              f"{lead} | {e['duration_us']:.2f} |")


def print_positions(result, top):
    shown = result["kernels"][:top]
    print(f"{result['runs']} runs of back-to-back graph steps; median us per step, then each kernel's median "
          f"critical-path share per step")
    print("| positions | steps | step us | " + " | ".join(k[:40] for k in shown) + " |")
    print("|---" * (3 + len(shown)) + "|")
    for b in result["buckets"]:
        cells = [f"{b['share_us'][k]:.1f}" if k in b["share_us"] else "-" for k in shown]
        print(f"| {b['positions'][0]}-{b['positions'][1]} | {b['steps']} | {b['step_us']:.1f} | "
              + " | ".join(cells) + " |")


def print_steps(result, top):
    print(f"{result['steps']} graph steps: {result['step_us']:.1f} us from the first kernel's start to the last's "
          f"end, {result['between_steps_us']:.1f} us between steps (median)")
    print("| kernel | launches / step | critical-path us / step | % | us per launch (start to end) |")
    print("|---|---|---|---|---|")
    for e in result["kernels"][:top]:
        print(f"| {e['kernel'][:90]} | {e['launches_per_step']:.0f} | {e['share_us_per_step']:.1f} | "
              f"{100 * e['share_us_per_step'] / result['step_us']:.1f} | {e['duration_us_per_launch']:.2f} |")

if __name__ == "__main__":
    main()
