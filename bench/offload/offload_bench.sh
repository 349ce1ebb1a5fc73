#!/usr/bin/env bash
# Expert-offloading benchmark for the GPU machine (issue: expert offloading). Runs, in one call:
#   1. the link and memory figures the floor is made of: pinned host->device copy GB/s and host DRAM read
#      GB/s (torch, 16 threads), measured here and now;
#   2. moex bench with random weights held in host RAM (--load-format random) at a GPU memory budget, for the
#      Mixtral-8x7B shape (16 GiB, 40 GiB) and the Qwen3-30B-A3B shape (8 GiB), with and without pre-gating,
#      and with the experts packed in host memory (--pack-experts, the *_packed cases; their floors count the
#      packed bytes a miss costs, expert_host_bytes);
#   2b. prefill 512 / 2048 tokens of a 4-layer Mixtral-8x7B shape at 6 GiB (llama.cpp's prefill setting in
#      PEERS.md), with the defaults (streamed scan steps) and --no-scan-steps, unless CASES=pregate;
#   3. a table with the floor per token: the missed experts' bytes split optimally between a PCIe copy and a
#      CPU read, both at once (bytes / (pcie + dram)), next to moex's ms/token; the shared floor: the same bytes
#      at the rate both paths reached together when measured at once (they share the host's DRAM); and the
#      work floor: every byte the step copied or read on the CPU (prefetched hits included) over both paths.
# Usage (device): MOEX=path/to/moex bench/offload/offload_bench.sh [--quick]
#   MOEX_BASE=path/to/other/moex also runs each pre-gating + CPU-expert case with that binary first (named
#   base_*), for before/after in one call. CASES=pregate skips the LRU cases; CASES="name name ..." runs only
#   the cases named (the names in the table; "prefill" for the prefill case). TOKENS=N decode tokens (default 8).
#   ACCELERATE=1 also runs transformers + accelerate offload (bench/peers/accelerate_offload.py) and the ratio.
set -uo pipefail
cd "$(dirname "$0")/../.."
moex="${MOEX:-.device/offload/bin/moex}"
# tools/device_cuda.sh prepare ships its binaries gzipped (the carry limit): unpack them here.
for bin in "$moex" "${MOEX_BASE:-}"; do
  [ -n "$bin" ] && [ ! -x "$bin" ] && [ -f "$bin.gz" ] && gunzip -f "$bin.gz" && chmod +x "$bin"
done
# The shared libraries travel next to the binary: <dir>/bin/moex, <dir>/lib/*.so.
export LD_LIBRARY_PATH="$(cd "$(dirname "$moex")/.." && pwd)/lib:${LD_LIBRARY_PATH:-}"
out="${OUT:-/tmp/moex_offload}"
mkdir -p "$out"
quick=0
[ "${1:-}" = "--quick" ] && quick=1
export PYTHONUNBUFFERED=1

python3 - "$out/links.json" <<'PY'
import json, sys, time, torch
res = {}
x = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
y = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
for _ in range(2): y.copy_(x, non_blocking=True)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10): y.copy_(x, non_blocking=True)
torch.cuda.synchronize()
res["h2d_pinned_gbs"] = 10 * (1 << 30) / (time.perf_counter() - t) / 1e9
torch.set_num_threads(16)
h = torch.ones(1 << 30, dtype=torch.float32)  # 4 GiB
h.sum()
t = time.perf_counter()
for _ in range(5): h.sum()
res["host_read_gbs"] = 5 * 4 * (1 << 30) / (time.perf_counter() - t) / 1e9
# Both at once: the copy engine and the CPU read the same host DRAM. On the GPU machines the two together moved
# ~145 GB/s, not pinned + read (~165): the floor that assumes they add up is optimistic there.
import threading
copied, read, stop = [0], [0], threading.Event()
def copy_loop():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        while not stop.is_set():
            y.copy_(x, non_blocking=True); s.synchronize(); copied[0] += 1 << 30
thread = threading.Thread(target=copy_loop)
thread.start()
time.sleep(0.2)
c0, t = copied[0], time.perf_counter()
for _ in range(10):  # ~0.5 s: whole 1 GiB copies (~20 ms each) count, so the window must be long
    h.sum(); read[0] += 4 * (1 << 30)
elapsed = time.perf_counter() - t
c1 = copied[0]
stop.set(); thread.join()
res["concurrent_h2d_gbs"] = (c1 - c0) / elapsed / 1e9
res["concurrent_host_read_gbs"] = read[0] / elapsed / 1e9
res["gpu"] = torch.cuda.get_device_name()
json.dump(res, open(sys.argv[1], "w"))
print(res)
PY

# Correctness on the device first: offloaded runs (prefetch, CPU experts) give the resident run's tokens.
fx=tests/fixtures/qwen2_moe
ids=$(python3 -c "import json;print(','.join(map(str,json.load(open('$fx/reference.json'))['prompt_ids'])))")
ref=$(python3 -c "import json;print(json.load(open('$fx/reference.json'))['greedy_ids'])")
# A GPU budget that leaves room for top_k + 2 experts: resident weights (Engine::resident_weight_bytes) + 1 GiB reserve.
budget=$(python3 - "$fx/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); h = c["hidden_size"]; hd = c.get("head_dim") or h // c["num_attention_heads"]
q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
mlp_only = c.get("mlp_only_layers", [])
e = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
for l in range(c["num_hidden_layers"]):
    e += h * (q + 2 * kv) + q * h
    if l in mlp_only: e += 3 * c["intermediate_size"] * h
    else: e += c["num_experts"] * h + 3 * c.get("shared_expert_intermediate_size", 0) * h + h
expert = 3 * h * c["moe_intermediate_size"] * 2
print(2 * e + (1 << 30) + (c["num_experts_per_tok"] + 2) * expert)
PY
)
# Without a predictor the link is idle when a miss comes, so CPU experts split misses (--host-read-gbs moves
# the split point).
# The fixture's experts are a few KB: --split-overhead-ms 0 lets them split all the same.
for flags in "" "--gpu-memory $budget --predictor pregate" "--gpu-memory $budget --predictor pregate --cpu-experts" \
  "--gpu-memory $budget --cpu-experts --split-overhead-ms 0" \
  "--gpu-memory $budget --cpu-experts --split-overhead-ms 0 --host-read-gbs 20" \
  "--gpu-memory $budget --predictor pregate --cpu-experts --split-overhead-ms 0 --pack-experts"; do
  "$moex" run -m $fx --device cuda $flags --prompt-ids "$ids" -n 16 --temperature 0 --ignore-eos --json \
    >"$out/check.json" 2>"$out/check.err"
  got=$(python3 -c "import json;print(json.load(open('$out/check.json'))['output_ids'])" 2>/dev/null || cat "$out/check.err")
  [ "$got" = "$ref" ] && echo "correct: cuda $flags" || echo "MISMATCH: cuda $flags: $got vs $ref"
done

# One row per case from $out/results.jsonl (all cases, or only the one named).
report() {
python3 - "$out" "${1:-}" <<'PY'
import json, sys
out, only = sys.argv[1], sys.argv[2]
links = json.load(open(f"{out}/links.json"))
pcie, dram = links["h2d_pinned_gbs"], links["host_read_gbs"]
# Both paths at once share the host's DRAM (older links.json files lack the figure: then they add up).
shared = links.get("concurrent_h2d_gbs", pcie) + links.get("concurrent_host_read_gbs", dram)
if not only:
    print(f"\nGPU {links['gpu']}: pinned H2D {pcie:.1f} GB/s, host DRAM read {dram:.1f} GB/s; both at once "
          f"{links.get('concurrent_h2d_gbs', 0):.1f} + {links.get('concurrent_host_read_gbs', 0):.1f} = {shared:.1f} GB/s")
print(f"{'case':31} {'ms/token':>9} {'tok/s':>6} {'hit rate':>8} {'miss GB/tok':>11} {'on CPU/tok':>10} {'split/tok':>9} {'copied GB/tok':>13} {'CPU GB/tok':>10} {'floor ms':>8} {'x floor':>7} {'shared floor':>12} {'x shared':>8} {'work floor':>10} {'x work':>6} {'stall ms':>8} {'CPU ms':>6} {'CPU GB/s':>8} {'prefill tok/s':>13} {'pf prec':>7} {'pf rec':>6}")
for line in open(f"{out}/results.jsonl"):
    r = json.loads(line)
    name = r["case"]
    if only and name != only: continue
    if "decode" not in r:
        print(f"{name:31} failed"); continue
    d = r["decode_experts"]
    ms = r["decode"]["ms_per_token_mean"]
    # Floor at the measured miss rate: the missed experts' bytes split optimally between a PCIe copy and a
    # CPU read of host DRAM, both running at once. The bytes a miss costs the host: bf16, or packed with
    # --pack-experts (older results lack expert_host_bytes).
    miss_gb = d["misses_per_token"] * r.get("expert_host_bytes", r["expert_bytes"]) / 1e9
    floor = miss_gb / (pcie + dram) * 1e3
    # The same bytes at the rate both paths reached together (shared host DRAM).
    shared_floor = miss_gb / shared * 1e3
    # Work floor: what the step really moved: copies (prefetched hits included) and CPU reads of host DRAM.
    copied_gb = d["bytes_moved_per_token"] / 1e9
    # Builds without the counter ran every CPU miss whole.
    cpu_gb = d.get("cpu_read_bytes_per_token", d["cpu_computed_per_token"] * r.get("expert_host_bytes", r["expert_bytes"])) / 1e9
    work = (copied_gb + cpu_gb) / (pcie + dram) * 1e3
    print(f"{name:31} {ms:9.1f} {1000/ms:6.2f} {d['hit_rate']:8.3f} {miss_gb:11.2f} {d['cpu_computed_per_token']:10.1f} "
          f"{d.get('split_computed_per_token', 0):9.1f} {copied_gb:13.2f} {cpu_gb:10.2f} {floor:8.1f} "
          f"{ms/floor if floor else 0:7.2f} {shared_floor:12.1f} {ms/shared_floor if shared_floor else 0:8.2f} {work:10.1f} {ms/work if work else 0:6.2f} {d['stall_ms_per_token']:8.1f} "
          # Builds before the counter: no CPU time (the CPU path's reached rate is the question it answers).
          f"{d.get('cpu_ms_per_token', 0):6.1f} {d.get('cpu_read_gbs', 0):8.1f} "
          f"{r['prefill'][0]['tokens_per_s']:13.1f} {d['prefetch_precision']:7.2f} {d['prefetch_recall']:6.2f}")
PY
}

# Each case appends one JSON line to results.jsonl and its stderr to runs.log, and prints its row at once: few
# files come back from the device, and a call cut short by its time limit still reports the cases it ran.
# A case runs unless CASES names cases and not this one.
wanted() {
  case "${CASES:-all}" in
    all|pregate|prefill) [ "${CASES:-all}" != prefill ] || [ "$1" = prefill ] ;;
    *) [[ " $CASES " == *" ${1#base_} "* ]] ;;
  esac
}
run_case() {  # name model gpu_memory extra flags...
  local name="$1" model="$2" budget="$3" bin="${BIN:-$moex}"
  shift 3
  wanted "$name" || return 0
  echo "== $name: $model at $budget $* ($bin)" | tee -a "$out/runs.log"
  timeout 230 "$bin" bench -m "bench/offload/models/$model" --load-format random --device cuda \
    --gpu-memory "$budget" --prompt-lens 128 --decode-context 16 --decode-tokens "$tokens" --reps 1 --warmup 0 \
    "$@" --json >"$out/case.json" 2>>"$out/runs.log"
  local status=$?
  python3 -c "import json,sys
try: r = json.load(open(sys.argv[1]))
except Exception: r = {}
r['case'] = sys.argv[2]
print(json.dumps(r))" "$out/case.json" "$name" >>"$out/results.jsonl"
  rm -f "$out/case.json"
  echo "exit $status"
  report "$name"
}
tokens="${TOKENS:-8}"
touch "$out/results.jsonl"
[ "$quick" -eq 1 ] && tokens=4
run_pair() {  # name model gpu_memory extra flags...: MOEX_BASE's run first (when set), then this build's
  [ -n "${MOEX_BASE:-}" ] && BIN="$MOEX_BASE" run_case "base_$1" "${@:2}"
  run_case "$@"
}
run_pair mixtral_16g_pregate_cpu mixtral_8x7b 16GiB --predictor pregate --cpu-experts
# Prefetches weighed against the CPU's work (--balance-prefetch): the link was the long path at 16 GiB.
run_case mixtral_16g_pregate_cpu_balanced mixtral_8x7b 16GiB --predictor pregate --cpu-experts --balance-prefetch
run_pair qwen3_8g_pregate_cpu qwen3_30b_a3b 8GiB --predictor pregate --cpu-experts
# Experts held packed in host memory (--pack-experts): every miss reads ~3/4 of the bf16 bytes, copied or on the CPU.
run_case mixtral_16g_pregate_cpu_packed mixtral_8x7b 16GiB --predictor pregate --cpu-experts --pack-experts
# The same with the CPU's packed decode kept at AVX2 on an AVX-512 host (the A/B of its 512-bit decode).
MOEX_CPU_AVX512=0 run_case mixtral_16g_pregate_cpu_packed_avx2 mixtral_8x7b 16GiB --predictor pregate --cpu-experts \
  --pack-experts
run_case qwen3_8g_pregate_cpu_packed qwen3_30b_a3b 8GiB --predictor pregate --cpu-experts --pack-experts
run_pair mixtral_40g_pregate_cpu mixtral_8x7b 40GiB --predictor pregate --cpu-experts
run_case mixtral_40g_pregate_cpu_packed mixtral_8x7b 40GiB --predictor pregate --cpu-experts --pack-experts
if [ "${CASES:-all}" != "pregate" ]; then
  run_case mixtral_16g_lru mixtral_8x7b 16GiB
  run_case qwen3_8g_lru qwen3_30b_a3b 8GiB
fi

report

# Prefill with offloaded experts against llama.cpp's best setting in PEERS.md (4-layer 8x7B shape, experts in
# host RAM, pinned, micro-batch 2048: 3.0k tokens/s at 512, 9.4k at 2048 on the H200 machine). 6 GiB holds
# one layer's 8 experts but not the model's 32 (11.3 GB): every layer's experts cross the link per prompt.
# Floor: 32 experts x 352 MB over the link per prompt.
if [ "${CASES:-all}" != "pregate" ] && wanted prefill; then
  # MOEX_BASE's run first when set (before/after in one call); this build with its defaults (streamed scan
  # steps) and with --no-scan-steps.
  for run in ${MOEX_BASE:+base} default noscan; do
    bin="$moex" flags=()
    [ "$run" = base ] && bin="$MOEX_BASE"
    [ "$run" = noscan ] && flags=(--no-scan-steps)
    echo "== prefill: mixtral_8x7b_l4 at 6GiB ($bin ${flags[*]})" | tee -a "$out/runs.log"
    timeout 230 "$bin" bench -m bench/offload/models/mixtral_8x7b_l4 --load-format random --device cuda \
      --gpu-memory 6GiB --prompt-lens 512,2048 --decode-tokens 0 --reps 2 --warmup 1 "${flags[@]}" --json \
      >"$out/prefill.json" 2>>"$out/runs.log"
    echo "exit $?"
    python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
pcie = json.load(open(f"{out}/links.json"))["h2d_pinned_gbs"]
try:
    r = json.load(open(f"{out}/prefill.json"))
except Exception:
    sys.exit("prefill case failed (runs.log)")
floor_s = 32 * r["expert_bytes"] / (pcie * 1e9)
peers = {512: 3000, 2048: 9400}
print(f"whole run (warm-up and reps of both lengths): expert hits {r['expert_hits']} misses {r['expert_misses']}, "
      f"{r['bytes_moved'] / 1e9:.1f} GB moved, stall {r['stall_ms']:.0f} ms")
for p in r["prefill"]:
    n = p["prompt_tokens"]
    print(f"prefill {n} tokens: {p['tokens_per_s']:.0f} tokens/s (every expert over the link: {n / floor_s:.0f} at "
          f"{pcie:.1f} GB/s; llama.cpp {peers.get(n, 0)} in PEERS.md, H200 machine)")
PY
  done
fi

# ACCELERATE=1: transformers + accelerate offload in the same call (bench/peers/accelerate_offload.py: 2 layers of the
# 8x7B shape, every decoder layer offloaded), scaled to the full model at 16 GiB, against moex's 16 GiB case.
if [ "${ACCELERATE:-0}" = 1 ]; then
  echo "== accelerate offload: mixtral_8x7b, 2 layers" | tee -a "$out/runs.log"
  timeout 200 python3 bench/peers/accelerate_offload.py bench/offload/models/mixtral_8x7b --layers 2 --tokens 3 \
    --json "$out/accelerate.jsonl" >/dev/null 2>>"$out/runs.log"
  echo "exit $?"
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
try:
    a = json.loads(open(f"{out}/accelerate.jsonl").read().splitlines()[-1])
except Exception:
    sys.exit("accelerate failed (runs.log)")
# At 16 GiB accelerate keeps whole layers on the GPU: what is left after the embeddings and lm head, over a layer.
cfg = json.load(open("bench/offload/models/mixtral_8x7b/config.json"))
h, f, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
layer = 2 * (e * 3 * h * f + h * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]))
resident = max(0, int((16 * 2**30 - 2 * 2 * cfg["vocab_size"] * h) // layer))
full_ms = (cfg["num_hidden_layers"] - resident) * a["ms_per_offloaded_layer"]
print(f"accelerate: {a['ms_per_offloaded_layer']:.1f} ms per offloaded layer; at 16 GiB {resident} of "
      f"{cfg['num_hidden_layers']} layers resident -> {full_ms / 1e3:.2f} s/token")
for line in open(f"{out}/results.jsonl"):
    r = json.loads(line)
    if r["case"] == "mixtral_16g_pregate_cpu" and "decode" in r:
        ms = r["decode"]["ms_per_token_mean"]
        print(f"moex {r['case']}: {ms:.1f} ms/token -> {full_ms / ms:.1f}x accelerate")
PY
fi
