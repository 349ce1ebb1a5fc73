#!/usr/bin/env bash
# Real pre-gating on moex's default model, replayed by the simulator (issue: expert offloading).
# 1. prompts: the first paragraph of 200-600 characters of each held-out Brown document (the default model's
#    held-out split; tools/fetch_corpus.sh fetches the corpus into .device/corpus);
# 2. `moex trace record --pregate-logits`: each prompt plus 32 greedy tokens, every MoE layer's routing and the
#    next layer's router applied to its hidden state;
# 3. `moex trace simulate`: policies x predictors x cache sizes, per-layer and global caches.
# Usage: bench/traces/pregate_default.sh [MOEX_BINARY]   (default build/cpu-release/moex)
set -euo pipefail
cd "$(dirname "$0")/../.."
moex="${1:-build/cpu-release/moex}"
corpus=.device/corpus/brown.jsonl
[ -f "$corpus" ] || tools/fetch_corpus.sh
work="${TMPDIR:-/tmp}/moex_pregate_default"
mkdir -p "$work"
python3 - "$corpus" "$work/prompts.txt" <<'PY'
import json, sys
prompts = []
for line in open(sys.argv[1]):
    doc = json.loads(line)
    if doc["split"] != "heldout":
        continue
    prompts += [p for p in doc["paragraphs"] if 200 < len(p) < 600][:1]
open(sys.argv[2], "w").write("\n".join(prompts) + "\n")
print(f"{len(prompts)} held-out prompts", file=sys.stderr)
PY
"$moex" trace record --prompts "$work/prompts.txt" --out "$work/default_pregate.moext" -n 32 --pregate-logits
"$moex" trace stats --trace "$work/default_pregate.moext"
# Per layer, 8 experts: 10% would be one slot, below top-2; the global pool takes 10% too.
"$moex" trace simulate --trace "$work/default_pregate.moext" --policy lru,activation,belady \
  --predictor none,affinity,eam,pregate --cache-fraction 0.25,0.5 --scope layer
"$moex" trace simulate --trace "$work/default_pregate.moext" --policy lru,activation,belady \
  --predictor none,affinity,eam,pregate --cache-fraction 0.1,0.25,0.5 --scope global
