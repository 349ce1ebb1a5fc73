#!/usr/bin/env bash
# llama.cpp on the GPU machine, in the same call as moex, on the shapes of PEERS.md and the issues' benchmarks.
# Random bf16 GGUFs are written first (bench/peers/make_gguf.py, from the configs moex's benchmarks use).
#
# Usage (device): LLAMA_BIN=dir-with-llama-bench bench/peers/llama_cpp_bench.sh [case ...]
#   cases (default all):
#     model_a    Model A resident: batch-1 decode (llama-bench tg128) and, where llama-batched-bench is
#                there, batched decode at 1 / 8 / 32 sequences (16-token prompts, 32 steps)
#     cpu_experts  Mixtral-8x7B layers with the experts computed on the CPU (-ot exps=CPU, 15 and 16 threads),
#                2- and 4-layer models: per layer = (t4 - t2) / 2, the 32-layer figure = t2 + 30 per layer
#                (how PEERS.md measured it: the full model's bf16 GGUF does not fit the machine's disk)
#     prefill    the 4-layer 8x7B shape with experts in pinned host memory (-lm none), micro-batch 2048,
#                512 and 2048 tokens: llama.cpp's best offloaded prefill setting in PEERS.md
# Writes $OUT/llama_cpp.jsonl (one object per figure: case, metric, value, unit) and prints it as a table.
# GGUFs go to $GGUF_DIR (default /tmp/moex_gguf; ~24 GB for all cases).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin="${LLAMA_BIN:?LLAMA_BIN: the directory with llama-bench}"
out="${OUT:-/tmp/moex_llama}"
gguf="${GGUF_DIR:-/tmp/moex_gguf}"
mkdir -p "$out" "$gguf"
[ -x "$bin/llama-bench" ] || { echo "llama_cpp_bench: no executable $bin/llama-bench" >&2; exit 2; }
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(model_a cpu_experts prefill)
results="$out/llama_cpp.jsonl"
: >"$results"

make_model() {  # config layers name
  [ -s "$gguf/$3.gguf" ] || python3 bench/peers/make_gguf.py "$1" "$gguf/$3.gguf" ${2:+--layers $2} || exit 1
}
emit() {  # case metric value unit
  printf '{"case": "%s", "metric": "%s", "value": %s, "unit": "%s"}\n' "$1" "$2" "$3" "$4" >>"$results"
}
# Mean tokens/s of each llama-bench test (jsonl lines), keyed "n_prompt/n_gen/n_threads", best over thread counts.
bench_ts() {  # log file: prints "key avg_ts" lines
  python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        print(f'{r["n_prompt"]}/{r["n_gen"]}/{r["n_threads"]} {r["avg_ts"]:.4f} {r.get("stddev_ts", 0):.4f}')
PY
}

for c in "${cases[@]}"; do
  case "$c" in
    model_a)
      make_model bench/cuda/models/model_a/config.json "" model_a
      "$bin/llama-bench" -m "$gguf/model_a.gguf" -ngl 99 -fa on -p 0 -n 128 -r 3 -o jsonl \
        >"$out/model_a.jsonl" 2>"$out/model_a.err"
      read -r _ ts sd < <(bench_ts "$out/model_a.jsonl" | head -1)
      [ -n "${ts:-}" ] && emit model_a decode_batch1_ms_per_token "$(python3 -c "print(round(1000 / $ts, 4))")" ms
      if [ -x "$bin/llama-batched-bench" ]; then
        "$bin/llama-batched-bench" -m "$gguf/model_a.gguf" -ngl 99 -fa on -c 4096 -b 2048 -ub 512 -npp 16 -ntg 32 \
          -npl 1,8,32 --output-format jsonl >"$out/model_a_batched.jsonl" 2>"$out/model_a_batched.err"
        python3 - "$out/model_a_batched.jsonl" <<'PY' >>"$results"
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(json.dumps({"case": "model_a", "metric": f'batched_{r["pl"]}_tokens_per_s', "value": round(r["speed_tg"], 1),
                          "unit": "tokens/s"}))
PY
      fi
      ;;
    cpu_experts)
      make_model bench/offload/models/mixtral_8x7b/config.json 2 mixtral_l2
      make_model bench/offload/models/mixtral_8x7b/config.json 4 mixtral_l4
      for l in 2 4; do
        "$bin/llama-bench" -m "$gguf/mixtral_l$l.gguf" -ngl 99 -ot "exps=CPU" -t 15,16 -fa on -p 0 -n 32 -r 2 \
          -o jsonl >"$out/cpu_experts_l$l.jsonl" 2>"$out/cpu_experts_l$l.err"
      done
      python3 - "$out" <<'PY' >>"$results"
import json, sys
best = {}
for l in (2, 4):
    ts = [json.loads(x)["avg_ts"] for x in open(f"{sys.argv[1]}/cpu_experts_l{l}.jsonl") if x.startswith("{")]
    if ts: best[l] = 1000 / max(ts)
if len(best) == 2:
    layer = (best[4] - best[2]) / 2
    for metric, v in (("ms_per_token_2_layers", best[2]), ("ms_per_token_4_layers", best[4]),
                      ("ms_per_layer", layer), ("ms_per_token_32_layers", best[2] + 30 * layer)):
        print(json.dumps({"case": "cpu_experts", "metric": metric, "value": round(v, 3), "unit": "ms"}))
    print(json.dumps({"case": "cpu_experts", "metric": "tokens_per_s_32_layers",
                      "value": round(1000 / (best[2] + 30 * layer), 3), "unit": "tokens/s"}))
PY
      ;;
    prefill)
      make_model bench/offload/models/mixtral_8x7b/config.json 4 mixtral_l4
      "$bin/llama-bench" -m "$gguf/mixtral_l4.gguf" -ngl 99 -ot "exps=CPU" -lm none -fa on -b 2048 -ub 2048 \
        -p 512,2048 -n 0 -r 2 -o jsonl >"$out/prefill.jsonl" 2>"$out/prefill.err"
      bench_ts "$out/prefill.jsonl" | while read -r key ts _; do
        emit prefill "prefill_${key%%/*}_tokens_per_s" "$ts" tokens/s
      done
      ;;
    *) echo "llama_cpp_bench: unknown case $c (model_a, cpu_experts, prefill)" >&2; exit 2 ;;
  esac
done
python3 - "$results" <<'PY'
import json, sys
print("| case | metric | value |\n|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f'| {r["case"]} | {r["metric"]} | {r["value"]} {r["unit"]} |')
PY
