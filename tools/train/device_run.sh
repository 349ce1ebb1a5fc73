#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: trains the tokenizer (unless models/default has one),
# trains every preset in parallel (small models leave the GPU mostly idle, so they share it well), picks
# the default model with the best held-out perplexity, and packs what comes back into $OUT:
#   default_model.tar.gz.part-*  the chosen models/default directory (split to stay under 16 MiB a file)
#   <preset>.traces.jsonl.gz     expert traces of the chosen default and of each routing model
#   meta.tar.gz                  reports, logs, tokenizer, routing models' config and reference.json
#   run.log                      this script's log
# Needs .device/corpus/brown.jsonl (tools/fetch_corpus.sh) carried along.
# Knobs (environment): PRESETS, BUDGET_DEFAULT, BUDGET_ROUTING (seconds of training), TRACE_PROMPTS.
set -uo pipefail
root="$(pwd)"
here="$root/tools/train"
corpus="$root/.device/corpus/brown.jsonl"
work=/tmp/moex_train
out="${OUT:-/tmp/moex_out}"
presets="${PRESETS:-default_d8_bal routing_mixtral32 routing_fine64}"  # what made the committed files
budget_default="${BUDGET_DEFAULT:-400}"
budget_routing="${BUDGET_ROUTING:-395}"
trace_prompts="${TRACE_PROMPTS:-300}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$work/logs" "$out"
exec > >(tee "$out/run.log") 2>&1

echo "== $(date +%T) start; presets: $presets"
python3 -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, torch.cuda.get_device_name(0))"
[ -f "$corpus" ] || { echo "missing $corpus (run tools/fetch_corpus.sh and carry .device)"; exit 1; }

tokdir="$work/tokenizer"
mkdir -p "$tokdir"
if [ -f "$root/models/default/tokenizer.json" ] && [ -z "${RETRAIN_TOKENIZER:-}" ]; then
  cp "$root/models/default/tokenizer.json" "$root/models/default/tokenizer_config.json" "$tokdir/"
  echo "using the committed tokenizer"
else
  (cd "$here" && python3 train_tokenizer.py --corpus "$corpus" --out "$tokdir") || exit 1
fi

pids=()
for p in $presets; do
  budget="$budget_default"
  case "$p" in routing_*) budget="$budget_routing" ;; esac
  (cd "$here" && exec python3 train_moe.py --preset "$p" --corpus "$corpus" --tokenizer "$tokdir" \
     --out "$work/models/$p" --report "$work/$p.report.json" --traces "$work/$p.traces.jsonl.gz" \
     --trace-prompts "$trace_prompts" --budget-s "$budget") >"$work/logs/$p.log" 2>&1 &
  pids+=($!)
  sleep 2
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "== $(date +%T) training done"
for p in $presets; do echo "--- $p"; grep -E "done:|saved checkpoint|Error|error|finished|experts implementation|traces" "$work/logs/$p.log" | tail -8; done

best="$(cd "$work" && python3 - <<'EOF'
import glob, json, os
best = None
for path in sorted(glob.glob("default_*.report.json")):
    r = json.load(open(path))
    ppl = r.get("heldout", {}).get("ppl")
    size = sum(r.get("files", {}).values())
    print(f"{r['preset']}: held-out ppl {ppl}, {size} bytes", file=__import__('sys').stderr)
    if ppl and size <= 25_000_000 and (best is None or ppl < best[0]):
        best = (ppl, r["preset"])
print(best[1] if best else "")
EOF
)"
echo "== chosen default: ${best:-none}"

cd "$work"
if [ -n "$best" ]; then
  rm -rf default && cp -r "models/$best" default
  tar czf default_model.tar.gz default && split -b 15m -d default_model.tar.gz "$out/default_model.tar.gz.part-"
  cp "$best.traces.jsonl.gz" "$out/" 2>/dev/null
fi
for p in $presets; do
  case "$p" in routing_*) cp "$p.traces.jsonl.gz" "$out/" 2>/dev/null ;; esac
done
meta=(logs tokenizer *.report.json)
for d in models/*; do
  mkdir -p "meta_models/$(basename "$d")"
  cp "$d"/config.json "$d"/generation_config.json "$d"/reference.json "meta_models/$(basename "$d")/" 2>/dev/null
done
tar czf "$out/meta.tar.gz" "${meta[@]}" meta_models 2>/dev/null
ls -la "$out"
echo "== $(date +%T) end"
