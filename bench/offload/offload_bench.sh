#!/usr/bin/env bash
# Expert-offloading benchmark for the GPU machine (issue: expert offloading). Runs, in one call:
#   1. the link and memory figures the floor is made of: pinned host->device copy GB/s and host DRAM read
#      GB/s (torch, 16 threads), measured here and now;
#   2. moex bench with random weights held in host RAM (--load-format random) at a GPU memory budget, for the
#      Mixtral-8x7B shape (16 GiB, 40 GiB) and the Qwen3-30B-A3B shape (8 GiB), with and without pre-gating;
#   3. a table with the floor per token: the missed experts' bytes split optimally between a PCIe copy and a
#      CPU read, both at once (bytes / (pcie + dram)), next to moex's ms/token.
# Usage (device): MOEX=path/to/moex bench/offload/offload_bench.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/../.."
moex="${MOEX:-.device/offload/bin/moex}"
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
res["gpu"] = torch.cuda.get_device_name()
json.dump(res, open(sys.argv[1], "w"))
print(res)
PY

run_case() {  # name model gpu_memory predictor
  local name="$1" model="$2" budget="$3" predictor="$4"
  echo "== $name: $model at $budget, predictor $predictor"
  timeout 540 "$moex" bench -m "bench/offload/models/$model" --load-format random --device cuda \
    --gpu-memory "$budget" --predictor "$predictor" --lookahead-layers 1 --prompt-lens 128 \
    --decode-context 16 --decode-tokens "$tokens" --reps 1 --warmup 0 --json >"$out/$name.json" 2>"$out/$name.err"
  echo "exit $? $(tail -c 400 "$out/$name.err")"
}
tokens=8
[ "$quick" -eq 1 ] && tokens=4
run_case mixtral_16g_none mixtral_8x7b 16GiB none
run_case mixtral_16g_pregate mixtral_8x7b 16GiB pregate
if [ "$quick" -eq 0 ]; then
  run_case mixtral_40g_pregate mixtral_8x7b 40GiB pregate
  run_case qwen3_8g_pregate qwen3_30b_a3b 8GiB pregate
fi

python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
links = json.load(open(f"{out}/links.json"))
pcie, dram = links["h2d_pinned_gbs"], links["host_read_gbs"]
print(f"\nGPU {links['gpu']}: pinned H2D {pcie:.1f} GB/s, host DRAM read {dram:.1f} GB/s")
print(f"{'case':24} {'ms/token':>10} {'tok/s':>7} {'hit rate':>8} {'GB moved/token':>14} {'floor ms':>9} {'x floor':>7} {'prefill tok/s':>13} {'pf prec':>7} {'pf rec':>6}")
for path in sorted(glob.glob(f"{out}/*.json")):
    name = os.path.basename(path)[:-5]
    if name == "links": continue
    try:
        r = json.load(open(path))
    except Exception:
        print(f"{name:24} failed"); continue
    ms = r["decode"]["ms_per_token_mean"]
    d = r["decode_experts"]
    per_token_gb = d["bytes_moved_per_token"] / 1e9
    # floor: the decode-phase missed bytes per token, split optimally between PCIe and host DRAM reads
    floor = per_token_gb / (pcie + dram) * 1e3
    rate = d["hit_rate"]
    print(f"{name:24} {ms:10.1f} {1000/ms:7.2f} {rate:8.3f} {per_token_gb:14.2f} {floor:9.1f} {ms/floor if floor else 0:7.2f} {r['prefill'][0]['tokens_per_s']:13.1f} {d['prefetch_precision']:7.2f} {d['prefetch_recall']:6.2f}")
PY
