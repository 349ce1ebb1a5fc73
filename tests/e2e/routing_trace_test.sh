#!/usr/bin/env bash
# `moex bench --routing-trace`: a trace replayed through the engine in place of the router's choice. Replaying
# the model's own routing (recorded by --trace-out with the same flags) must leave the offloaded decode's expert
# hits and misses exactly as they were; a constant routing must make every decode access after the first hit a
# cache that holds it; a trace of another shape, or with --batch, is a clear error.
# Usage: routing_trace_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"
fixture="$src/tests/fixtures/mixtral"  # 2 MoE layers x 8 experts, top-2

flags=(bench -m "$fixture" --host-memory 80KiB --prompt-lens 4 --decode-context 6 --decode-tokens 5 --reps 2 --warmup 1
       --json)
if "$moex" "${flags[@]}" --trace-out "$tmp/own.bin" >"$tmp/a.json" 2>"$tmp/err" &&
   "$moex" "${flags[@]}" --routing-trace "$tmp/own.bin" >"$tmp/b.json" 2>"$tmp/err"; then
  python3 - "$tmp/a.json" "$tmp/b.json" <<'PY' && ok || fail "replaying the model's own routing changed the expert traffic"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
da, db = a["decode_experts"], b["decode_experts"]
assert da["misses"] > 0 and da["hits"] > 0, da  # a budget that both hits and misses
for key in ("hits", "misses", "bytes_moved_per_token"):
    assert da[key] == db[key], (key, da[key], db[key])
r = b["routing_trace"]
assert r["requests"] == 3 and r["replayed_rows"] == 3 * (6 + 5) * 2, r  # 3 reps x 11 positions x 2 MoE layers
assert "routing_trace" not in a
PY
else
  fail "bench --trace-out / --routing-trace exited non-zero: $(cat "$tmp/err")"
fi

# Every token at every layer routed to experts 0 and 1: with room for two experts per layer (4 in all), the decode
# steps hit after the first touch of each layer.
python3 - "$tmp/const.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"num_layers": 2, "num_experts": 8, "top_k": 2, "tokens": [[[0, 1], [0, 1]]] * 40}) + "\n")
PY
expert_bytes=$("$moex" bench -m "$fixture" --prompt-lens 4 --decode-tokens 1 --reps 1 --warmup 0 --json |
  python3 -c "import json,sys; print(json.load(sys.stdin)['expert_bytes'])")
if "$moex" bench -m "$fixture" --host-memory "$((4 * expert_bytes / 1024 + 1))KiB" --prompt-lens 4 --decode-context 6 \
    --decode-tokens 5 --reps 2 --warmup 1 --routing-trace "$tmp/const.jsonl" --json >"$tmp/c.json" 2>"$tmp/err"; then
  python3 - "$tmp/c.json" <<'PY' && ok || fail "a constant routing did not hit"
import json, sys
d = json.load(open(sys.argv[1]))["decode_experts"]
assert d["misses"] == 0 and d["hits"] == 2 * 5 * 2 * 2, d  # 2 timed reps x 5 steps x 2 layers x top-2
PY
else
  fail "bench with a constant routing trace exited non-zero: $(cat "$tmp/err")"
fi

python3 -c "
import json
print(json.dumps({'num_layers': 3, 'num_experts': 8, 'top_k': 2, 'tokens': [[[0, 1]] * 3]}))" >"$tmp/wrong.jsonl"
expect_error "trace of another shape" "the trace routes 3 MoE layers x 8 experts, top-2; the model has 2 x 8, top-2" \
  "$moex" bench -m "$fixture" --prompt-lens 4 --decode-tokens 2 --reps 1 --routing-trace "$tmp/wrong.jsonl"
expect_error "with --batch" "--routing-trace replays one sequence: not with --batch" \
  "$moex" bench -m "$fixture" --prompt-lens 4 --decode-tokens 2 --reps 1 --batch 2 --routing-trace "$tmp/const.jsonl"
# Requests without tokens are skipped; a trace of nothing else is an error, not a division by zero.
python3 - "$tmp/empty.jsonl" "$tmp/one.jsonl" <<'PY'
import json, sys
empty = {"num_layers": 2, "num_experts": 8, "top_k": 2, "tokens": []}
with open(sys.argv[1], "w") as f:
    f.write(json.dumps(empty) + "\n")
with open(sys.argv[2], "w") as f:
    f.write(json.dumps(empty) + "\n" + json.dumps(dict(empty, tokens=[[[0, 1], [2, 3]]])) + "\n")
PY
expect_error "trace without tokens" "the trace has no tokens" \
  "$moex" bench -m "$fixture" --prompt-lens 4 --decode-tokens 2 --reps 1 --routing-trace "$tmp/empty.jsonl"
"$moex" bench -m "$fixture" --prompt-lens 4 --decode-tokens 2 --reps 2 --routing-trace "$tmp/one.jsonl" --json \
  >"$tmp/one.json" 2>"$tmp/err" && python3 -c "
import json; r = json.load(open('$tmp/one.json'))['routing_trace']; assert r['requests'] == 1, r" && ok ||
  fail "a trace with an empty request: $(cat "$tmp/err")"
expect_error "missing trace" "$tmp/none.jsonl" \
  "$moex" bench -m "$fixture" --prompt-lens 4 --decode-tokens 2 --reps 1 --routing-trace "$tmp/none.jsonl"

finish
