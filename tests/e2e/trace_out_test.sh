#!/usr/bin/env bash
# `moex bench --trace-out`: the routing of the benchmark's decode repetitions as a moex trace that `moex trace`
# reads back, one request per repetition, its decoded tokens the model's greedy continuation of its prompt.
# Usage: trace_out_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"
fixture="$src/tests/fixtures/mixtral"

if ! "$moex" bench -m "$fixture" --prompt-lens 4 --decode-context 6 --decode-tokens 5 --reps 1 --warmup 1 \
  --trace-out "$tmp/t.bin" --json >"$tmp/bench.json" 2>"$tmp/err"; then
  fail "bench --trace-out exited non-zero: $(cat "$tmp/err")"
fi
"$moex" trace stats --trace "$tmp/t.bin" >"$tmp/stats" 2>&1 && ok || fail "trace stats cannot read it: $(cat "$tmp/stats")"
grep -q "2 requests, 22 tokens" "$tmp/stats" && ok || fail "expected 2 requests of 6 + 5 tokens: $(head -1 "$tmp/stats")"
"$moex" trace convert --in "$tmp/t.bin" --out "$tmp/t.jsonl" --format jsonl >/dev/null 2>&1 && ok || fail "trace convert"

# The timed repetition's prompt through `moex run`: its greedy tokens are the trace's decoded ones.
prompt=$(python3 -c "
import json; r = [json.loads(l) for l in open('$tmp/t.jsonl')][1]
print(','.join(map(str, r['token_ids'][:6])))")
"$moex" run -m "$fixture" --prompt-ids "$prompt" -n 5 --temperature 0 --ignore-eos --json >"$tmp/run.json" 2>"$tmp/err" ||
  fail "run on the traced prompt: $(cat "$tmp/err")"
# The same 11 tokens as one prompt through `moex logits --router`: the routing the trace holds, position by position.
all_ids=$(python3 -c "
import json; r = [json.loads(l) for l in open('$tmp/t.jsonl')][1]
print(','.join(map(str, r['token_ids'])))")
"$moex" logits -m "$fixture" --prompt-ids "$all_ids" --router >"$tmp/logits.json" 2>"$tmp/err" ||
  fail "logits --router on the traced tokens: $(cat "$tmp/err")"
python3 - "$tmp/t.jsonl" "$tmp/bench.json" "$tmp/run.json" "$tmp/t.bin" "$tmp/logits.json" <<'PY' && ok || fail "trace contents"
import json, sys
reqs = [json.loads(l) for l in open(sys.argv[1])]
bench, run = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
assert bench["trace_out"] == sys.argv[4], bench.get("trace_out")
assert [r["request_id"] for r in reqs] == ["decode-rep0", "decode-rep1"], [r.get("request_id") for r in reqs]
for r in reqs:
    assert r["num_layers"] == 2 and r["num_experts"] == 8 and r["top_k"] == 2, r
    assert len(r["tokens"]) == 11 and len(r["token_ids"]) == 11
    for token, weights in zip(r["tokens"], r["gate_weights"]):
        assert len(token) == 2
        for ids, w in zip(token, weights):
            assert len(set(ids)) == 2 and all(0 <= e < 8 for e in ids), ids
            assert abs(sum(w) - 1) < 2e-3, w  # Mixtral renormalises its top-2 (f16 in the file)
assert reqs[1]["token_ids"][6:] == run["output_ids"], (reqs[1]["token_ids"], run["output_ids"])
assert reqs[0]["token_ids"][:6] != reqs[1]["token_ids"][:6]  # each repetition draws its own prompt
topk = json.load(open(sys.argv[5]))["router_topk_ids"]  # [moe layer][position][k]
for pos, token in enumerate(reqs[1]["tokens"]):
    for layer, ids in enumerate(token):
        assert sorted(ids) == sorted(topk[layer][pos]), (pos, layer, ids, topk[layer][pos])
PY

# Bad input: a trace path that cannot be created is an error before any work, not a crash.
"$moex" bench -m "$fixture" --prompt-lens 4 --decode-tokens 2 --reps 1 --warmup 0 --trace-out "$tmp/missing/t.bin" \
  >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 0 ] || [ $rc -ge 128 ]; then fail "unwritable --trace-out: exit $rc"; fi
grep -qF "$tmp/missing/t.bin" "$tmp/err" && ok || fail "unwritable --trace-out: the error does not name the path: $(cat "$tmp/err")"

finish
