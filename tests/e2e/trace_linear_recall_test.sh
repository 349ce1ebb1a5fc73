#!/usr/bin/env bash
# tools/trace_linear_recall.py (how well a linear model of expert ids guesses the next layer's experts) on two
# synthetic traces: one where each layer's expert follows from the layer before (recall near 1, in-sample and held
# out) and one where layers are independent (held-out recall near chance); clear errors for bad input.
# Usage: trace_linear_recall_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"
tool="$src/tools/trace_linear_recall.py"

python3 - "$tmp" <<'PY'
import json, random, sys
rng = random.Random(7)
for name, rule in (("chain", True), ("noise", False)):
    with open(f"{sys.argv[1]}/{name}.jsonl", "w") as f:
        for r in range(3):
            tokens = []
            for t in range(60):
                e = rng.randrange(4)
                layers = [[e]]
                for l in range(1, 4):
                    e = (e + 1) % 4 if rule else rng.randrange(4)
                    layers.append([e])
                tokens.append(layers)
            line = {"model": name, "num_layers": 4, "num_experts": 4, "top_k": 1, "tokens": tokens}
            if rule:
                line["gate_weights"] = [[[1.0] for _ in layers] for layers in tokens]
            f.write(json.dumps(line) + "\n")
PY

recall() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['recall'])" "$1"; }
for mode in loo in-sample; do
  if python3 "$tool" "$tmp/chain.jsonl" --mode "$mode" --json >"$tmp/chain_$mode.json" 2>"$tmp/err"; then
    r=$(recall "$tmp/chain_$mode.json")
    python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 0.95 else 1)" "$r" && ok ||
      fail "chain trace, $mode: recall $r, expected >= 0.95"
  else
    fail "chain trace, $mode: $(cat "$tmp/err")"
  fi
done
python3 "$tool" "$tmp/chain.jsonl" --gate-weights >"$tmp/weighted" 2>&1 && grep -q "(gate-weighted): next-layer top-1 recall 1.000" "$tmp/weighted" && ok ||
  fail "gate-weighted chain trace: $(cat "$tmp/weighted")"
if python3 "$tool" "$tmp/noise.jsonl" --json >"$tmp/noise.json" 2>"$tmp/err"; then
  r=$(recall "$tmp/noise.json")
  python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 0.45 else 1)" "$r" && ok ||
    fail "noise trace, held out: recall $r, expected near 0.25"
else
  fail "noise trace: $(cat "$tmp/err")"
fi
python3 "$tool" "$tmp/chain.jsonl" --guesses 4 >"$tmp/all4" 2>&1 && grep -q "top-4 recall 1.000" "$tmp/all4" && ok ||
  fail "four guesses of four experts must find every one: $(cat "$tmp/all4")"

expect_error "no gate weights" "the trace has no gate_weights" python3 "$tool" "$tmp/noise.jsonl" --gate-weights
expect_error "missing file" "cannot read" python3 "$tool" "$tmp/none.jsonl"
echo '{"tokens": 1}' >"$tmp/bad.jsonl"
expect_error "not a trace" "is not a JSONL routing trace" python3 "$tool" "$tmp/bad.jsonl"
head -1 "$tmp/chain.jsonl" >"$tmp/one.jsonl"
expect_error "one request held out" "needs at least two requests" python3 "$tool" "$tmp/one.jsonl" --mode loo
finish
