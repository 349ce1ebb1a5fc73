#!/usr/bin/env bash
# Tokenizer encode benchmark: moex vs the Hugging Face `tokenizers` library (Rust, Node binding), same
# documents (Brown corpus), same machine, same run, one thread each. Prints JSON lines and a Markdown table
# row per family for bench/RESULTS.md.
# Usage: bench/tokenizer/run.sh BUILD_DIR [REPS] [FAMILY...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:?usage: run.sh BUILD_DIR [REPS] [FAMILY...]}"; shift
reps="${1:-5}"; [ $# -gt 0 ] && shift
families=("$@"); [ ${#families[@]} -eq 0 ] && families=(qwen3 llama2 deepseek_v3 gptoss olmoe)
"$root/tools/fetch_tokenizers.sh" --with-reference
docs="$root/third_party/downloads/bench/brown_4mb.jsonl"
mkdir -p "$(dirname "$docs")"
[ -s "$docs" ] || node "$root/bench/tokenizer/hf_tokenizers_bench.js" prepare "$docs" 4000000
commit="$(git -C "$root" rev-parse --short HEAD)"
for family in "${families[@]}"; do
  dir="$root/third_party/downloads/tokenizers/$family"
  if [ "$family" = olmoe ]; then
    dir="$(mktemp -d)"
    xz -dc "$root/../shared/tokenizers/olmoe/tokenizer.json.xz" > "$dir/tokenizer.json" || { echo "skip olmoe" >&2; continue; }
  fi
  ours="$(taskset -c 0 "$build/bench/moex_tokenizer_bench" "$dir" "$docs" "$reps")"
  peer="$(taskset -c 0 node "$root/bench/tokenizer/hf_tokenizers_bench.js" run "$dir/tokenizer.json" "$docs" "$reps")"
  echo "$ours" | sed "s/^{/{\"family\":\"$family\",\"commit\":\"$commit\",/"
  echo "$peer" | sed "s/^{/{\"family\":\"$family\",\"commit\":\"$commit\",/"
  python3 - "$family" "$ours" "$peer" <<'PY'
import json, sys
fam, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
check = "same" if a["tokens"] == b["tokens"] else f"DIFFERENT ({a['tokens']} vs {b['tokens']})"
print(f"| {fam} | {a['bytes']/1e6:.2f} | {a['mb_per_s']:.2f} ± {a['mb_per_s_stddev']:.2f} | "
      f"{b['mb_per_s']:.2f} ± {b['mb_per_s_stddev']:.2f} | {a['mb_per_s']/b['mb_per_s']:.2f}x | {check} |")
PY
done
