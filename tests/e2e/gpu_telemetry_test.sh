#!/usr/bin/env bash
# --gpu-telemetry end to end, with a stand-in NVML (tests/unit/telemetry/fake_nvml.cc, path in
# $MOEX_TEST_FAKE_NVML): the figures land in `moex bench --json` per phase and in `moex run --json` stats; a
# missing NVML is an error with `on` and a note with `auto`; `off` and the CPU under `auto` report nothing.
# Usage: gpu_telemetry_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"
fixture="$src/tests/fixtures/mixtral"
fake="${MOEX_TEST_FAKE_NVML:?MOEX_TEST_FAKE_NVML: the stand-in NVML library (set by ctest)}"

bench=("$moex" bench -m "$fixture" --prompt-lens 8 --decode-tokens 4 --decode-context 4 --reps 2 --batch 2
       --gpu-energy-seconds 0.01 --json)
if MOEX_NVML_LIBRARY="$fake" "${bench[@]}" --gpu-telemetry on >"$tmp/bench.json" 2>"$tmp/err"; then
  python3 - "$tmp/bench.json" <<'PY' && ok || fail "bench --gpu-telemetry on: JSON"
import json, sys
out = json.load(open(sys.argv[1]))
assert out["gpu"] == {"name": "Fake GPU", "pci_bus_id": "index 0"}, out["gpu"]
# Per phase: metered repetitions after the timed ones until their windows sum to 0.01 s; a window (one
# repetition's timed part) reads the stand-in's counter twice, 1.5 J apart.
for phase, tokens in ((out["prefill"][0], 8), (out["decode"], 4), (out["batch_decode"][0], 2 * 4)):
    g = phase["gpu"]
    n = g["windows"]
    assert n >= 1 and g["seconds"] >= 0.01, g
    assert g["energy_source"] == "counter" and g["energy_j"] == 1.5 * n, g
    assert abs(g["joules_per_token"] - 1.5 / tokens) < 1e-12, (g, tokens)
    assert g["power_w_sampled_mean"] == 250.0 and g["power_w_sampled_max"] == 250.0, g
    assert abs(g["power_w"] - 1.5 * n / g["seconds"]) < 1e-9 * g["power_w"], g
    assert g["gpu_util_mean"] == 87.0 and g["memory_util_mean"] == 42.0, g
    assert g["samples"] >= 2 * n, g
PY
else
  fail "bench --gpu-telemetry on exited non-zero: $(cat "$tmp/err")"
fi
MOEX_NVML_LIBRARY="$fake" FAKE_NVML_NO_ENERGY=1 "${bench[@]}" --gpu-telemetry on >"$tmp/bench.json" 2>"$tmp/err" &&
  python3 -c "
import json, sys
g = json.load(open('$tmp/bench.json'))['decode']['gpu']
assert g['energy_source'] == 'power samples' and abs(g['energy_j'] - 250 * g['seconds']) < 1e-9 * g['energy_j'], g
assert abs(g['power_w'] - 250) < 1e-6, g
" && ok || fail "bench without an energy counter: $(cat "$tmp/err")"
# The text output names the GPU and puts a line under each phase (power from the samples: a steady 250 W).
MOEX_NVML_LIBRARY="$fake" FAKE_NVML_NO_ENERGY=1 "${bench[@]::${#bench[@]}-1}" --gpu-telemetry on >"$tmp/text" 2>"$tmp/err" &&
  grep -q "GPU telemetry: Fake GPU" "$tmp/text" &&
  [ "$(grep -c "GPU 250 W, .* J/token, busy 87% (memory 42%) \[energy from power samples\]" "$tmp/text")" -eq 3 ] && ok ||
  fail "bench text output: $(cat "$tmp/text" "$tmp/err")"

prompt=$(python3 -c "import json;print(','.join(map(str,json.load(open('$fixture/reference.json'))['prompt_ids'])))")
if MOEX_NVML_LIBRARY="$fake" "$moex" run -m "$fixture" --prompt-ids "$prompt" -n 5 --temperature 0 --ignore-eos --json \
    --gpu-telemetry on >"$tmp/run.json" 2>"$tmp/err"; then
  python3 - "$tmp/run.json" <<'PY' && ok || fail "run --gpu-telemetry on: JSON"
import json, sys
gpu = json.load(open(sys.argv[1]))["stats"]["gpu"]
assert gpu["name"] == "Fake GPU", gpu
g = gpu["generation"]
assert g["energy_j"] == 1.5 and abs(g["joules_per_token"] - 1.5 / 5) < 1e-12, g
PY
else
  fail "run --gpu-telemetry on exited non-zero: $(cat "$tmp/err")"
fi

# Missing NVML: `on` is an error naming the library, `auto` on the CPU never loads it, `off` reports nothing.
MOEX_NVML_LIBRARY=/nonexistent/libnvidia-ml.so.1 "${bench[@]}" --gpu-telemetry on >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -qF "cannot load /nonexistent/libnvidia-ml.so.1" "$tmp/err"; then ok
else fail "bench --gpu-telemetry on without NVML: exit $rc, $(cat "$tmp/err")"; fi
for mode in auto off; do
  MOEX_NVML_LIBRARY="$fake" "${bench[@]}" --gpu-telemetry $mode >"$tmp/bench.json" 2>"$tmp/err" &&
    python3 -c "
import json
out = json.load(open('$tmp/bench.json'))
assert 'gpu' not in out and 'gpu' not in out['decode'] and 'gpu' not in out['prefill'][0], out
" && ok || fail "bench --gpu-telemetry $mode on the CPU reports GPU figures: $(cat "$tmp/err")"
done
"$moex" bench -m "$fixture" --gpu-telemetry sometimes >"$tmp/out" 2>"$tmp/err"
rc=$?
[ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -q "gpu-telemetry" "$tmp/err" && ok || fail "bad --gpu-telemetry value: exit $rc"

finish
