#!/usr/bin/env bash
# tools/kernel_trace.py (the decode step's critical path from a CUPTI kernel timeline) on a synthetic trace whose
# shares are known: the averaged table, --by-position (runs split at the prompt's gap, per-position medians, a
# .gz trace read as such), --by-launch (each launch's share, lead and duration), --prompts (eager kernels per
# prompt, the longest prompts only), and clear errors for input that is not a kernel trace.
# Usage: kernel_trace_tool_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"
tool="$src/tools/kernel_trace.py"

# Two runs of three graph steps (correlation ids 1-6), 1 ms apart (a prefill); inside a run steps follow 1 us
# apart. Each step: gemv 0-10 us, then attention, which starts early (at 8 us: PDL) and ends 4 + 2 * position us
# after the gemv (its cost grows with the position, as attention's does with the context). One eager kernel
# (graph_id 0) must be ignored.
python3 - "$tmp/trace.csv" <<'PY'
import sys
rows = ["start_ns,end_ns,correlation,graph_id,stream,grid,block,shared,registers,name"]
t, corr = 0, 0
rows.append("0,500000,99,0,13,1,32,0,16,eager_kernel")
t = 1_000_000
for run in range(2):
    for position in range(3):
        corr += 1
        gemv_end = t + 10_000
        attn_end = gemv_end + 4_000 + 2_000 * position
        rows.append(f"{t},{gemv_end},{corr},7,13,256,256,0,64,moex::cuda::(anonymous namespace)::gemv_kernel<1; 8>")
        rows.append(f"{t + 8_000},{attn_end},{corr},7,13,16,128,0,114,decode_attention_kernel")
        t = attn_end + 1_000
    t += 1_000_000
open(sys.argv[1], "w").write("\n".join(rows) + "\n")
PY
gzip -k "$tmp/trace.csv"

if python3 "$tool" "$tmp/trace.csv" --json >"$tmp/all.json" 2>"$tmp/err"; then
  python3 - "$tmp/all.json" <<'PY' && ok || fail "the averaged table is wrong: $(cat "$tmp/all.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["steps"] == 6, r
share = {k["kernel"]: k["share_us_per_step"] for k in r["kernels"]}
assert abs(share["gemv_kernel<1; 8>"] - 10.0) < 1e-9, share  # the anonymous namespace dropped from the name
assert abs(share["decode_attention_kernel"] - 6.0) < 1e-9, share  # (4 + 6 + 8) / 3
assert abs(r["between_steps_us"] - 1.0) < 1e-9, r  # the median gap: the prefill gap is one of five
assert abs(r["step_us"] - 16.0) < 1e-9, r
PY
else
  fail "kernel_trace.py --json exited non-zero: $(cat "$tmp/err")"
fi

if python3 "$tool" "$tmp/trace.csv.gz" --by-position --bucket 1 --json >"$tmp/pos.json" 2>"$tmp/err"; then
  python3 - "$tmp/pos.json" <<'PY' && ok || fail "--by-position is wrong: $(cat "$tmp/pos.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["runs"] == 2, r
assert [b["positions"] for b in r["buckets"]] == [[0, 0], [1, 1], [2, 2]], r
assert [b["steps"] for b in r["buckets"]] == [2, 2, 2], r
assert [round(b["share_us"]["decode_attention_kernel"], 9) for b in r["buckets"]] == [4.0, 6.0, 8.0], r
assert [round(b["step_us"], 9) for b in r["buckets"]] == [14.0, 16.0, 18.0], r
assert r["kernels"][0] == "gemv_kernel<1; 8>", r
PY
else
  fail "kernel_trace.py --by-position exited non-zero: $(cat "$tmp/err")"
fi

# --by-launch: per launch in stream order. gemv first (no kernel before it: no lead), share 10 us; attention starts
# 2 us before the gemv ends (lead 2), share the median of 4, 6, 8 (twice each) = 6, duration 6 / 8 / 10 -> 8.
if python3 "$tool" "$tmp/trace.csv" --by-launch --json >"$tmp/launch.json" 2>"$tmp/err"; then
  python3 - "$tmp/launch.json" <<'PY' && ok || fail "--by-launch is wrong: $(cat "$tmp/launch.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["steps"] == 6 and r["kernels_per_step"] == 2, r
gemv, attention = r["launches"]
assert gemv["kernel"] == "gemv_kernel<1; 8>" and gemv["grid"] == 256 and gemv["registers"] == 64, gemv
assert gemv["lead_us"] is None and abs(gemv["share_us"] - 10.0) < 1e-9, gemv
assert attention["kernel"] == "decode_attention_kernel" and attention["registers"] == 114, attention
assert abs(attention["lead_us"] - 2.0) < 1e-9 and abs(attention["share_us"] - 6.0) < 1e-9, attention
assert abs(attention["duration_us"] - 8.0) < 1e-9, attention
PY
else
  fail "kernel_trace.py --by-launch exited non-zero: $(cat "$tmp/err")"
fi
python3 "$tool" "$tmp/trace.csv" --by-launch >"$tmp/ltable" 2>"$tmp/err" &&
  grep -q "^| 1 | decode_attention_kernel | 16 | 114 | 6.00 | 2.00 | 8.00 |$" "$tmp/ltable" && ok ||
  fail "--by-launch table: $(cat "$tmp/ltable" "$tmp/err")"

# --with: two more graph steps (correlation 50-51, after the six) that hold a planner kernel, 30 us each: only
# they are kept (batched steps among a benchmark's batch-1 ones), and a kernel no step holds is an error.
python3 - "$tmp/trace.csv" "$tmp/mixed.csv" <<'PY'
import sys
rows = open(sys.argv[1]).read().splitlines()
t = 20_000_000
for corr in (50, 51):
    rows.append(f"{t},{t + 10_000},{corr},8,13,1,1024,0,40,moex::cuda::(anonymous namespace)::moe_plan_tokens_kernel<1>")
    rows.append(f"{t + 10_000},{t + 30_000},{corr},8,13,64,256,0,128,moe_gate_up_rows_kernel<4>")
    t += 31_000
open(sys.argv[2], "w").write("\n".join(rows) + "\n")
PY
if python3 "$tool" "$tmp/mixed.csv" --with moe_plan_tokens_kernel --json >"$tmp/with.json" 2>"$tmp/err" &&
   python3 "$tool" "$tmp/mixed.csv" --json >"$tmp/without.json" 2>>"$tmp/err"; then
  python3 - "$tmp/with.json" "$tmp/without.json" <<'PY' && ok || fail "--with is wrong: $(cat "$tmp/with.json")"
import json, sys
r, every = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert r["steps"] == 2 and abs(r["step_us"] - 30.0) < 1e-9 and abs(r["between_steps_us"] - 1.0) < 1e-9, r
assert {k["kernel"] for k in r["kernels"]} == {"moe_plan_tokens_kernel<1>", "moe_gate_up_rows_kernel<4>"}, r
assert every["steps"] == 8, every
PY
else
  fail "kernel_trace.py --with exited non-zero: $(cat "$tmp/err")"
fi
if python3 "$tool" "$tmp/mixed.csv" --with no_such_kernel >"$tmp/out" 2>"$tmp/err"; then
  fail "--with a kernel no step holds exited 0"
else
  grep -q "no CUDA graph launch holds a kernel named no_such_kernel" "$tmp/err" && ok || fail "--with error: $(cat "$tmp/err")"
fi

# The gap that splits runs: at 2000 us the six steps are one run, positions 0-5 in buckets of 4.
one_run='import json, sys; r = json.load(open(sys.argv[1])); assert r["runs"] == 1, r
assert [b["steps"] for b in r["buckets"]] == [4, 2], r'
if python3 "$tool" "$tmp/trace.csv" --by-position --run-gap-us 2000 --bucket 4 --json >"$tmp/one.json" 2>"$tmp/err" &&
   python3 -c "$one_run" "$tmp/one.json"; then
  ok
else
  fail "--run-gap-us 2000: $(cat "$tmp/one.json" "$tmp/err")"
fi

# The table form prints a row per bucket.
python3 "$tool" "$tmp/trace.csv" --by-position --bucket 2 >"$tmp/table" 2>"$tmp/err" &&
  grep -q "^| 0-1 | 4 | 15.0 | 10.0 | 5.0 |$" "$tmp/table" && ok ||
  fail "--by-position table: $(cat "$tmp/table" "$tmp/err")"

# --prompts: two prompts of four eager kernels 1 ms apart, a two-kernel one (fewer kernels: left out) and a graph
# launch (ignored). Each long prompt: norm 0-10 us, gemm 10-50, combine 45-60 (overlapping the gemm: 10 us of the
# span its own), 5 us with nothing running, add 65-70.
python3 - "$tmp/prompts.csv" <<'PY'
import sys
rows = ["start_ns,end_ns,correlation,graph_id,stream,grid,block,shared,registers,name"]
t, corr = 0, 0
for kernels in (4, 2, 4):
    spans = [(0, 10, "norm", 2048), (10, 50, "gemm", 320), (45, 60, "combine", 2048), (65, 70, "add", 4096)]
    for start, end, name, grid in spans[:kernels]:
        corr += 1
        rows.append(f"{t + start * 1000},{t + end * 1000},{corr},0,13,{grid},256,0,32,{name}")
    t += 1_000_000
rows.append(f"{t},{t + 5000},{corr + 1},7,13,1,32,0,16,graph_kernel")
open(sys.argv[1], "w").write("\n".join(rows) + "\n")
PY
if python3 "$tool" "$tmp/prompts.csv" --prompts --json >"$tmp/prompts.json" 2>"$tmp/err"; then
  python3 - "$tmp/prompts.json" <<'PY' && ok || fail "--prompts is wrong: $(cat "$tmp/prompts.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["prompts"] == 2 and r["kernels_per_prompt"] == 4, r
assert abs(r["prompt_us"] - 70.0) < 1e-9 and abs(r["idle_us"] - 5.0) < 1e-9, r
k = {e["kernel"]: e for e in r["kernels"]}
assert [e["kernel"] for e in r["kernels"]] == ["gemm", "norm", "combine", "add"], r
assert abs(k["combine"]["share_us"] - 10.0) < 1e-9 and abs(k["combine"]["duration_us"] - 15.0) < 1e-9, k
assert k["gemm"]["grid"] == "320" and k["gemm"]["launches"] == 1, k
PY
else
  fail "kernel_trace.py --prompts exited non-zero: $(cat "$tmp/err")"
fi
python3 "$tool" "$tmp/prompts.csv" --prompts >"$tmp/ptable" 2>"$tmp/err" &&
  grep -q "^| gemm | 320 | 1 | 40.0 | 40.0 | 57.1 |$" "$tmp/ptable" && ok ||
  fail "--prompts table: $(cat "$tmp/ptable" "$tmp/err")"
# --common: the kernel count most runs have. Two more two-kernel runs (norm 0-10 us, gemm 10-50) after the trace
# above make three two-kernel runs against two four-kernel ones: --common takes the three (as batched decode steps
# outnumber a benchmark's prompts), plain --prompts still the four-kernel ones.
python3 - "$tmp/prompts.csv" "$tmp/steps.csv" <<'PY'
import sys
rows = open(sys.argv[1]).read().splitlines()
t = 10_000_000
for run in range(2):
    for start, end, name in ((0, 10, "norm"), (10, 50, "gemm")):
        rows.append(f"{t + start * 1000},{t + end * 1000},{900 + run * 2 + (name == 'gemm')},0,13,2048,256,0,32,{name}")
    t += 1_000_000
open(sys.argv[2], "w").write("\n".join(rows) + "\n")
PY
if python3 "$tool" "$tmp/steps.csv" --prompts --common --json >"$tmp/steps.json" 2>"$tmp/err"; then
  python3 - "$tmp/steps.json" <<'PY' && ok || fail "--prompts --common is wrong: $(cat "$tmp/steps.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["prompts"] == 3 and r["kernels_per_prompt"] == 2, r
assert abs(r["prompt_us"] - 50.0) < 1e-9, r
PY
else
  fail "kernel_trace.py --prompts --common exited non-zero: $(cat "$tmp/err")"
fi
python3 "$tool" "$tmp/steps.csv" --prompts --json >"$tmp/most.json" 2>"$tmp/err" &&
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['kernels_per_prompt'] == 4, r" \
    "$tmp/most.json" && ok || fail "--prompts without --common: $(cat "$tmp/most.json" "$tmp/err")"
# --prompts --by-launch: the four-kernel prompts' launches in start order; the add waited 5 us with nothing running.
if python3 "$tool" "$tmp/prompts.csv" --prompts --by-launch --json >"$tmp/launches.json" 2>"$tmp/err"; then
  python3 - "$tmp/launches.json" <<'PY' && ok || fail "--prompts --by-launch is wrong: $(cat "$tmp/launches.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["prompts"] == 2 and r["kernels_per_prompt"] == 4, r
assert [e["kernel"] for e in r["launches"]] == ["norm", "gemm", "combine", "add"], r
add, combine = r["launches"][3], r["launches"][2]
assert abs(add["idle_us"] - 5.0) < 1e-9 and abs(add["share_us"] - 5.0) < 1e-9, add
assert combine["idle_us"] == 0 and abs(combine["share_us"] - 10.0) < 1e-9 and abs(combine["duration_us"] - 15.0) < 1e-9
PY
else
  fail "kernel_trace.py --prompts --by-launch exited non-zero: $(cat "$tmp/err")"
fi
python3 "$tool" "$tmp/prompts.csv" --prompts --by-launch >"$tmp/ltable" 2>"$tmp/err" &&
  grep -q "^| 3 | add | 4096 | 5.00 | 5.00 | 5.00 |$" "$tmp/ltable" && ok ||
  fail "--prompts --by-launch table: $(cat "$tmp/ltable" "$tmp/err")"
# --cut-at add --with add: each long prompt's add (65-70 us, 5 us after the combine's end) is a run of its own, and
# only those runs hold an add.
if python3 "$tool" "$tmp/prompts.csv" --prompts --cut-at add --with add --json >"$tmp/cut.json" 2>"$tmp/err"; then
  python3 - "$tmp/cut.json" <<'PY' && ok || fail "--cut-at / --with is wrong: $(cat "$tmp/cut.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["prompts"] == 2 and r["kernels_per_prompt"] == 1, r
assert [e["kernel"] for e in r["kernels"]] == ["add"] and abs(r["before_us"] - 5.0) < 1e-9, r
PY
else
  fail "kernel_trace.py --cut-at / --with exited non-zero: $(cat "$tmp/err")"
fi
expect_error "--with matching no run" "no run of eager kernels holds a kernel named argmax" python3 "$tool" \
  "$tmp/prompts.csv" --prompts --with argmax
expect_error "a zero prompt gap" "--prompt-gap-us must be positive" python3 "$tool" "$tmp/prompts.csv" --prompts \
  --prompt-gap-us 0
printf 'start_ns,end_ns,correlation,graph_id,name\n0,10,1,7,in_a_graph\n' >"$tmp/graphs.csv"
expect_error "no eager kernels" "no kernels launched one by one" python3 "$tool" "$tmp/graphs.csv" --prompts

printf 'not,a,trace\n1,2,3\n' >"$tmp/other.csv"
expect_error "a CSV of other columns" "is not a kernel trace" python3 "$tool" "$tmp/other.csv"
head -c 100 /dev/urandom >"$tmp/binary.csv"
printf '\x8b\xff\xfe' >>"$tmp/binary.csv"
expect_error "binary input" "kernel_trace:" python3 "$tool" "$tmp/binary.csv"
expect_error "a missing file" "cannot read" python3 "$tool" "$tmp/none.csv"
expect_error "a zero bucket" "--bucket must be at least 1" python3 "$tool" "$tmp/trace.csv" --by-position --bucket 0
printf 'start_ns,end_ns,correlation,graph_id,name\n0,10,1,0,eager\n' >"$tmp/eager.csv"
expect_error "no graph launches" "no kernels from CUDA graph launches" python3 "$tool" "$tmp/eager.csv" --by-position
expect_error "no graph launches (--by-launch)" "no kernels from CUDA graph launches" python3 "$tool" "$tmp/eager.csv" \
  --by-launch

finish
