#!/usr/bin/env bash
# End-to-end checks of the moex CLI as a user drives it: the JSON contract, and one clear error line with
# a non-zero exit (never a crash) for each kind of bad input.
# Usage: cli_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"
fixture="$src/tests/fixtures/mixtral"

# JSON contract of run and logits.
prompt=$(python3 -c "import json;print(','.join(map(str,json.load(open('$fixture/reference.json'))['prompt_ids'])))")
if "$moex" run -m "$fixture" --prompt-ids "$prompt" -n 16 --temperature 0 --ignore-eos --json >"$tmp/run.json" 2>"$tmp/err"; then
  python3 - "$tmp/run.json" "$fixture/reference.json" <<'PY' && ok || fail "run --json contract"
import json, sys
out = json.load(open(sys.argv[1])); ref = json.load(open(sys.argv[2]))
for key in ("prompt_ids", "output_ids", "text", "stats"):
    assert key in out, key
for key in ("expert_hits", "expert_misses", "bytes_moved", "prefetch_precision", "prefetch_recall", "stall_ms",
            "model_host_read_gbs", "model_copy_gbs"):
    assert key in out["stats"], key
assert out["prompt_ids"] == ref["prompt_ids"]
assert out["output_ids"] == ref["greedy_ids"], (out["output_ids"], ref["greedy_ids"])
PY
else
  fail "run --json exited non-zero: $(cat "$tmp/err")"
fi
if "$moex" logits -m "$fixture" --prompt-ids "$prompt" --router --json >"$tmp/logits.json" 2>"$tmp/err"; then
  python3 - "$tmp/logits.json" "$fixture/reference.json" <<'PY' && ok || fail "logits --json contract"
import json, sys
out = json.load(open(sys.argv[1])); ref = json.load(open(sys.argv[2]))
assert len(out["logits"]) == len(ref["prompt_ids"]) and len(out["logits"][0]) == len(ref["logits"][0])
diff = max(abs(a - b) for ra, rb in zip(out["logits"], ref["logits"]) for a, b in zip(ra, rb))
assert diff < 1e-3, diff
assert len(out["router_logits"]) == len(ref["router_logits"])
PY
else
  fail "logits exited non-zero: $(cat "$tmp/err")"
fi
"$moex" run -n 4 >"$tmp/out" 2>"$tmp/err" && ok || fail "moex run with no -m (embedded default model): $(cat "$tmp/err")"
"$moex" --help >"$tmp/out" 2>&1 && grep -q "run" "$tmp/out" && ok || fail "--help"

# Text in, text out with the embedded default model (it ships a tokenizer and a chat template).
if "$moex" run -p "The old man walked" -n 8 --temperature 0 --json >"$tmp/text.json" 2>"$tmp/err"; then
  python3 - "$tmp/text.json" <<'PY' && ok || fail "run -p text output"
import json, sys
out = json.load(open(sys.argv[1]))
assert out["prompt_ids"][0] == 1 and len(out["prompt_ids"]) > 2, out["prompt_ids"]
assert len(out["output_ids"]) == 8 and len(out["text"]) > 0, out
PY
else
  fail "run -p exited non-zero: $(cat "$tmp/err")"
fi
"$moex" run --chat -p "Hello there." -n 4 --temperature 0 >"$tmp/out" 2>"$tmp/err" && ok || fail "run --chat: $(cat "$tmp/err")"

# Traces recorded by the engine itself feed the simulator.
printf 'The old man walked\nShe said that the house was empty.\n' >"$tmp/prompts.txt"
if "$moex" trace record --prompts "$tmp/prompts.txt" --out "$tmp/trace.bin" -n 4 >"$tmp/out" 2>"$tmp/err" &&
  "$moex" trace stats --trace "$tmp/trace.bin" --json >"$tmp/stats.json" 2>>"$tmp/err"; then
  python3 - "$tmp/stats.json" <<'PY' && ok || fail "trace record -> stats"
import json, sys
stats = json.load(open(sys.argv[1]))
layers = stats["layers"]
assert len(layers) == 8, len(layers)  # the default model's 8 MoE layers, each traced
assert all(layer["load_skew"] >= 1.0 for layer in layers), layers
PY
else
  fail "trace record/stats: $(cat "$tmp/err")"
fi
# With pre-gating logits recorded, the simulator replays the engine's own pre-gating.
if "$moex" trace record --prompts "$tmp/prompts.txt" --out "$tmp/pregate.bin" -n 4 --pregate-logits >"$tmp/out" 2>"$tmp/err" &&
  "$moex" trace simulate --trace "$tmp/pregate.bin" --predictor pregate --cache-fraction 0.5 --json \
    >"$tmp/sim.json" 2>>"$tmp/err"; then
  python3 - "$tmp/sim.json" <<'PY' && ok || fail "trace record --pregate-logits -> simulate"
import json, sys
runs = json.load(open(sys.argv[1]))
runs = runs["results"]
assert runs and all(r["prefetch"]["pregate_logits"] == "recorded" for r in runs), runs
PY
else
  fail "trace record --pregate-logits/simulate: $(cat "$tmp/err")"
fi
# The bound next to every row: no policy reads host memory less often than MIN with bypass; with
# --policy-admission belady is that bound and runs some misses on the host.
if "$moex" trace simulate --trace "$tmp/trace.bin" --policy lru,belady --cache-fraction 0.25 --scope global \
    --policy-admission --json >"$tmp/sim.json" 2>"$tmp/err"; then
  python3 - "$tmp/sim.json" <<'PY' && ok || fail "trace simulate --policy-admission"
import json, sys
runs = {r["policy"]: r for r in json.load(open(sys.argv[1]))["results"]}
bound = runs["belady"]["min_host_reads_per_token"]
assert runs["belady"]["host_reads_per_token"] == bound and runs["belady"]["policy_admission"], runs
assert runs["lru"]["host_reads_per_token"] >= bound and runs["lru"]["cpu_reads_per_token"] == 0, runs
PY
else
  fail "trace simulate --policy-admission: $(cat "$tmp/err")"
fi
# --host-gbs turns host reads into time: an expert of 1 MB at 100 GB/s is 0.01 ms.
if "$moex" trace simulate --trace "$tmp/trace.bin" --policy lru --cache-fraction 0.25 --scope global --host-gbs 100 \
    --expert-bytes 1000000 --json >"$tmp/sim.json" 2>"$tmp/err"; then
  python3 - "$tmp/sim.json" <<'PY' && ok || fail "trace simulate --host-gbs"
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
assert abs(r["min_host_floor_ms_per_token"] - 0.01 * r["min_host_reads_per_token"]) < 1e-9, r
assert abs(r["host_ms_per_token"] - 0.01 * r["host_reads_per_token"]) < 1e-9 and r["host_gbs"] == 100, r
PY
else
  fail "trace simulate --host-gbs: $(cat "$tmp/err")"
fi
expect_error "--host-gbs without the expert's bytes" "give --expert-bytes" \
  "$moex" trace simulate --trace "$tmp/trace.bin" --host-gbs 100
expect_error "--host-gbs nan" '--host-gbs: "nan" is not a number >= 0' \
  "$moex" trace simulate --trace "$tmp/trace.bin" --host-gbs nan
expect_error "negative --lookahead" '--lookahead: "-1" is not a number > 0' \
  "$moex" trace simulate --trace "$tmp/trace.bin" --lookahead -1
expect_error "negative --expert-bytes" '--expert-bytes: "-5" is not a number >= 0' \
  "$moex" trace simulate --trace "$tmp/trace.bin" --expert-bytes -5
expect_error "--cpu-misses with --policy-admission" "excludes" \
  "$moex" trace simulate --trace "$tmp/trace.bin" --cpu-misses --policy-admission
expect_error "trace record without prompts file" "cannot open the prompts file" \
  "$moex" trace record --prompts "$tmp/none.txt" --out "$tmp/t.bin"

# Bad input.
expect_error "empty prompt" "-p: the prompt is empty" "$moex" run -p ""
expect_error "invalid UTF-8 prompt" "not valid UTF-8" "$moex" run -p "$(printf '\xff\xfe')"
expect_error "--chat without a prompt" "--chat needs -p TEXT" "$moex" run --chat
expect_error "-p on a model without tokenizer" "has no tokenizer.json or tokenizer.model" "$moex" run -m "$fixture" -p "hi"
expect_error "malformed --prompt-ids" 'is not a comma-separated list of token ids (bad item "x")' \
  "$moex" run -m "$fixture" --prompt-ids 1,x
expect_error "empty --prompt-ids" "--prompt-ids: empty list" "$moex" logits -m "$fixture" --prompt-ids " " --json
expect_error "token id out of range" "token id 70000 is out of range" "$moex" run -m "$fixture" --prompt-ids 1,70000
expect_error "missing model dir" "model directory does not exist" "$moex" run -m "$tmp/nope" --prompt-ids 1
expect_error "unknown flag" "--bogus" "$moex" run --bogus
expect_error "bad temperature" '--temperature: "-1" is not a number >= 0' "$moex" run -m "$fixture" --prompt-ids 1 \
  --temperature -1
expect_error "zero top-p" '--top-p: "0" is not a number > 0' "$moex" run -m "$fixture" --prompt-ids 1 --top-p 0
expect_error "bad energy window" '--gpu-energy-seconds: "0" is not a number > 0' "$moex" bench -m "$fixture" \
  --gpu-energy-seconds 0
expect_error "non-numeric rate" '--host-read-gbs: "fast" is not a number > 0' "$moex" bench -m "$fixture" \
  --host-read-gbs fast
expect_error "bad device" "--device" "$moex" run -m "$fixture" --prompt-ids 1 --device tpu

cp -r "$fixture" "$tmp/truncated"
size=$(stat -c %s "$tmp/truncated/model.safetensors")
truncate -s $((size / 2)) "$tmp/truncated/model.safetensors"
expect_error "truncated safetensors" "truncated: tensor" "$moex" run -m "$tmp/truncated" --prompt-ids 1

cp -r "$fixture" "$tmp/corrupt"
printf '\xff\xff\xff\xff\xff\xff\xff\x7f' | dd of="$tmp/corrupt/model.safetensors" bs=1 count=8 conv=notrunc 2>/dev/null
expect_error "corrupt safetensors header" "corrupt or truncated safetensors header" "$moex" run -m "$tmp/corrupt" --prompt-ids 1

cp -r "$fixture" "$tmp/arch"
python3 - "$tmp/arch/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1])); cfg["architectures"] = ["BertModel"]; json.dump(cfg, open(sys.argv[1], "w"))
PY
expect_error "unknown architecture" 'unknown architecture "BertModel"' "$moex" run -m "$tmp/arch" --prompt-ids 1

cp -r "$fixture" "$tmp/badjson"
echo "{ not json" >"$tmp/badjson/config.json"
expect_error "corrupt config.json" "config.json: not valid JSON" "$moex" run -m "$tmp/badjson" --prompt-ids 1

# Batched decode in moex bench: one JSON row per batch size.
if "$moex" bench -m "$fixture" --prompt-lens 4 --decode-context 3 --decode-tokens 4 --reps 1 --warmup 0 --batch 1,3 \
  --json >"$tmp/bench.json" 2>"$tmp/err"; then
  python3 - "$tmp/bench.json" <<'PY' && ok || fail "bench --batch --json contract"
import json, sys
rows = json.load(open(sys.argv[1]))["batch_decode"]
assert [r["batch"] for r in rows] == [1, 3], rows
for r in rows:
    assert r["context"] == 3 and r["steps"] == 4 and r["ms_per_step_mean"] > 0, r
    assert abs(r["tokens_per_s"] - r["batch"] * 1000.0 / r["ms_per_step_mean"]) < 1e-6 * r["tokens_per_s"], r
PY
else
  fail "bench --batch exited non-zero: $(cat "$tmp/err")"
fi
expect_error "bench --batch 0" "--batch" "$moex" bench -m "$fixture" --batch 0
# The roofline's bytes (decode_bytes_per_token): a decode step reads the token's row of the embedding, not the
# table (which an untied model does not read again as the lm_head), every other resident weight and top_k experts
# per MoE layer. Both fixtures are bf16 and all-MoE.
for model in mixtral qwen3_moe_tied; do
  if "$moex" bench -m "$src/tests/fixtures/$model" --prompt-lens 4 --decode-context 3 --decode-tokens 2 --reps 1 \
    --warmup 0 --json >"$tmp/bytes.json" 2>"$tmp/err"; then
    python3 - "$tmp/bytes.json" "$src/tests/fixtures/$model/config.json" <<'PY' && ok || fail "bytes per token: $model"
import json, sys
out = json.load(open(sys.argv[1])); c = json.load(open(sys.argv[2]))
h, v, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
d = c.get("head_dim") or h // c["num_attention_heads"]
q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
experts = c.get("num_local_experts") or c["num_experts"]
top_k, ffn = c["num_experts_per_tok"], c.get("moe_intermediate_size") or c["intermediate_size"]
tied = c.get("tie_word_embeddings", False)
elems = v * h + (0 if tied else h) + layers * (h * (q + 2 * kv) + q * h + experts * h + top_k * 3 * ffn * h)
assert out["decode_bytes_per_token"] == 2 * elems, (out["decode_bytes_per_token"], 2 * elems)
PY
  else
    fail "bench ($model) exited non-zero: $(cat "$tmp/err")"
  fi
done
expect_error "negative split overhead" "--split-overhead-ms" "$moex" bench -m "$fixture" --split-overhead-ms -1
# --gpu-reserve is part of --gpu-memory's budget; a bad size, or one that leaves no room for experts, is named.
expect_error "reserve without a GPU budget" "--gpu-reserve is part of the --gpu-memory budget" "$moex" run \
  -m "$fixture" --prompt-ids 1 --gpu-reserve 256MiB
expect_error "reserve not a size" "--gpu-reserve" "$moex" run -m "$fixture" --prompt-ids 1 --device cuda \
  --gpu-memory 16GiB --gpu-reserve lots
expect_error "reserve over the budget" "reserve (--gpu-reserve), which leaves nothing for experts" "$moex" run \
  -m "$fixture" --prompt-ids 1 --device cuda --gpu-memory 1GiB --gpu-reserve 2GiB
expect_error "balanced prefetch without CPU experts" "--balance-prefetch" "$moex" bench -m "$fixture" \
  --balance-prefetch
expect_error "balanced prefetch both on and off" "balance-prefetch" "$moex" bench -m "$fixture" --balance-prefetch \
  --no-balance-prefetch
expect_error "adapted rates without CPU experts" "--adapt-rates" "$moex" bench -m "$fixture" --adapt-rates
# Offloading's own flags do nothing without an expert budget: an error, not a silent no-op.
expect_error "predictor without offloading" "--predictor applies when offloading" "$moex" run -m "$fixture" \
  --prompt-ids 1,2 -n 1 --predictor pregate
expect_error "scan steps without offloading" "--scan-steps applies when offloading" "$moex" bench -m "$fixture" \
  --scan-steps
expect_error "cache policy without offloading" "--cache-policy applies when offloading" "$moex" logits -m "$fixture" \
  --prompt-ids 1,2 --cache-policy lfu
if "$moex" run -m "$fixture" --prompt-ids 1,2 -n 2 --host-memory 64KiB --predictor pregate --cache-policy lfu \
  --scan-steps >/dev/null 2>"$tmp/err"; then ok; else fail "offloading flags with --host-memory: $(cat "$tmp/err")"; fi

# moex bench's offloading figures (--json decode_experts): a host budget below the experts makes misses.
if "$moex" bench -m "$fixture" --host-memory 40KiB --prompt-lens 8 --decode-tokens 8 --reps 1 --json \
    >"$tmp/bench.json" 2>"$tmp/err"; then
  python3 - "$tmp/bench.json" <<'PY' && ok || fail "bench --json decode_experts"
import json, sys
d = json.load(open(sys.argv[1]))["decode_experts"]
for key in ("hits", "misses", "hit_rate", "bytes_moved_per_token", "cpu_read_bytes_per_token",
            "host_read_bytes_per_token", "stall_ms_per_token", "prefetch_precision", "prefetch_recall"):
    assert key in d, key
assert d["misses"] > 0 and d["bytes_moved_per_token"] > 0, d
assert d["host_read_bytes_per_token"] == d["bytes_moved_per_token"] + d["cpu_read_bytes_per_token"], d
assert d["cache_bytes"] == 40 * 1024, d  # --host-memory 40KiB, all of it for experts on the CPU backend
assert d["cache_experts"] == d["cache_bytes"] // json.load(open(sys.argv[1]))["expert_bytes"], d
PY
else
  fail "bench --host-memory exited non-zero: $(cat "$tmp/err")"
fi

# --pack-experts: refused without an expert budget (before the load packs anything) and for experts that are not
# bf16; with one, bench reports the packed host bytes per expert, ~3/4 of the bf16 ones, and moves fewer bytes.
expect_error "packing without offloading" "--pack-experts applies when offloading" "$moex" run -m "$fixture" \
  --prompt-ids 1,2 -n 1 --pack-experts
expect_error "packing f32 experts" "--pack-experts packs bf16 experts" "$moex" run \
  -m "$src/tests/fixtures/qwen3_moe_f32" --prompt-ids 1,2 -n 1 --host-memory 64KiB --pack-experts
for pack in "" --pack-experts; do
  if ! "$moex" bench -m "$fixture" --host-memory 40KiB --prompt-lens 8 --decode-tokens 8 --reps 1 --json $pack \
      >"$tmp/bench$pack.json" 2>"$tmp/err"; then
    fail "bench --host-memory $pack exited non-zero: $(cat "$tmp/err")"
  fi
done
python3 - "$tmp/bench.json" "$tmp/bench--pack-experts.json" <<'PY' && ok || fail "bench --pack-experts"
import json, sys
plain, packed = (json.load(open(path)) for path in sys.argv[1:])
assert not plain["packed_experts"] and plain["expert_host_bytes"] == plain["expert_bytes"], plain
assert packed["packed_experts"] and 0.74 < packed["expert_host_bytes"] / packed["expert_bytes"] < 0.80, packed
assert packed["decode_experts"]["misses"] == plain["decode_experts"]["misses"]
assert packed["bytes_moved"] < 0.8 * plain["bytes_moved"], (packed["bytes_moved"], plain["bytes_moved"])
PY

finish
