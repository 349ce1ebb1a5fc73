#!/usr/bin/env bash
# The CUDA backend's one script for the GPU machine.
#   tools/device_cuda.sh prepare   here: build cuda_tests, the kernel benchmark and moex (cuda-release flags,
#                                  own build dir), copy them stripped with the shared libraries they need
#                                  into .device/cuda (gitignored), to be named in the run tool's `carry`, with a
#                                  fingerprint of the sources: every subcommand there stops at once when the
#                                  copied tree's sources differ (binaries left from before an edit or a revert).
#   tools/device_cuda.sh keep DIR [moex] [moex_cuda_kernels_bench]
#                                  here, before the next prepare: those prepared binaries (default both; ~13 MB each
#                                  compressed) into DIR/bin, to be carried and named BASELINE=DIR there (ab,
#                                  prefill). The carry limit is 64 MiB with the tracked tree: beside the ~47 MB
#                                  bundle one of them fits once models/default/model.safetensors (22 MB) is moved
#                                  out of the tree for the call, and $DEV/lib/libcupti* (4 MB, trace only) too.
#   tools/device_cuda.sh run       there: CUDA tests (ops + transformers fixtures), kernel benchmark, then
#                                  Model A / Model B decode at batch 1 (moex --load-format random) next to
#                                  transformers eager in the same call, nvidia-smi power/utilisation sampled
#                                  during each moex run; logs and JSON lines under $OUT, a table printed last.
#                                  Then `moex bench` per model: decode with recorded steps (CUDA graphs) and
#                                  eager (MOEX_CUDA_GRAPHS=0), prefill 512/2048, against the measured HBM; and
#                                  the 8x7B-shaped layer as the difference of a 3-layer and a 1-layer model;
#                                  batched decode at 1/8/32/128 sequences (moex bench --batch) next to llama.cpp.
# Options for run: --skip-tests, --skip-kernels, --skip-bench, --skip-layer, --skip-batch,
#                  --models "model_a model_b", --tokens N. The whole CUDA suite (run, ab) stops at
#                  MOEX_CUDA_TESTS_LIMIT_S (default 360; it takes ~255 s on an H200) and says so.
#   tools/device_cuda.sh ab        there: the short A/B call: HBM copy bandwidth, cuda_tests, then batch-1 decode of
#                                  Model A and B, batched decode of Model A (1/8/32/128), the 8x7B layer and
#                                  prefill at 512/2048 tokens (Model A, B, the 4-layer 8x7B offloaded at 6 GiB),
#                                  this build and BASELINE's (a dir with bin/moex[.gz]) interleaved in the same
#                                  call (machines differ between calls: compare within one). A table last.
#                                  Options: --variant NAME=VALUE[,NAME=VALUE] (repeatable: this build with an A/B
#                                  switch, e.g. MOEX_CUDA_DOWN_BLOCKS_PER_SM=0, run alongside), --quick (batch-1
#                                  and the 8x7B layer only), --screen (batch-1 decode of Model A and the 12-layer
#                                  Model B, bench/cuda/models/model_b_l12, each build and variant twice,
#                                  interleaved: for screening switches), --screen-batched (the same for batched
#                                  decode at 8/24/32 sequences: Model A and the 12-layer Model B; --batches
#                                  "2,4,8" screens other sizes), --skip-tests.
#   tools/device_cuda.sh profile   there: where one decode step's time goes, kernel by kernel (Nsight Compute's
#                                  gpu__time_duration, eager launches). Each case runs with 1 and 3 decode
#                                  steps; the difference / 2 cancels the prompt and setup kernels. Raw CSVs
#                                  under $PROFILE_DIR (default /tmp/moex_ncu), tables on standard output.
#                                  Options: --models "model_a model_b", --batch "1 32", --timeout S.
#   tools/device_cuda.sh trace     there: the decode step's real timeline (CUPTI kernel records through
#                                  tools/kernel_trace, overlap kept) and each kernel's share of its critical
#                                  path, overall and per position in the decode (tools/kernel_trace.py).
#                                  Options: --models, --batch "1 32", --tokens N, --env NAME=VALUE (repeatable:
#                                  an A/B switch for both runs), --prefill N (instead: prompts of N tokens, the
#                                  prefill's kernels per prompt, kernel_trace.py --prompts). At a batch above 1
#                                  the batched steps, which run eagerly (kernel_trace.py --prompts --common, cut
#                                  at each embedding launch, the runs holding the greedy pick: MOEX_TRACE_STEP_WITH,
#                                  default argmax_merge). Tables on
#                                  standard output; the traces and JSON in one archive, $OUT/trace.tgz, each
#                                  step's launches in order (kernel_trace.py --by-launch; batched: with the
#                                  idle time before each) in $OUT/launches_*.md.
#   tools/device_cuda.sh optin     there: the opt-in switches (MOEX_CUDA_DOWN_PRELOAD with
#                                  MOEX_CUDA_TOPK_IN_GATE_UP=0; within 0.4% on an H200):
#                                  their tests, then Model A / B batch-1 decode with each against the default, each
#                                  run with --gpu-telemetry on (NVML through moex: J/token and W next to ms/token).
#   tools/device_cuda.sh prefill   there: prefill of Model A and Model B at 512/2048 tokens, this build as is and with
#                                  each --variant NAME=VALUE[,NAME=VALUE] (e.g. MOEX_CUDA_WGMMA=0,
#                                  MOEX_CUDA_PREFILL_PLAN=0, MOEX_CUDA_GEMM_GATHER=0, MOEX_CUDA_CUBLAS=0,
#                                  MOEX_CUDA_PREFILL_KV_BF16=0), every run
#                                  twice, interleaved; then the prefill GEMM kernels per variant
#                                  (moex_cuda_kernels_bench --gemm-only, cuBLAS's dense rows where it loads) and
#                                  the attention kernels (--attention-only) and,
#                                  with --timeline, Model B's 2048-token timeline per variant (MOEX_CUDA_TIMELINE,
#                                  tools/cuda_timeline.py).
#                                  Options: --models "model_a model_b", --skip-tests (else the GEMM, MoE and routed
#                                  tests first), --skip-kernels (no kernel benchmarks: ~15 s a variant less).
#                                  BASELINE=DIR (a dir with bin/moex[.gz], and optionally
#                                  bin/moex_cuda_kernels_bench[.gz]): that build's prefill and GEMM kernels too,
#                                  interleaved, for changes that have no switch. A call's time: ~30 s a variant
#                                  and model for the prefill runs (two each), ~30 s a variant for the kernels;
#                                  three variants and the build overran 300 s (2026-11-29).
#   tools/device_cuda.sh peers     there: llama.cpp and moex on the same cases in one call (bench/peers/llama_cpp_bench.sh:
#                                  Model A batch 1, the 8x7B layers with experts on the CPU against moex's Mixtral-8x7B
#                                  at 16 GiB, the offloaded 4-layer prefill), a table with the ratios. LLAMA_BIN: the
#                                  directory with llama-bench (or llama-bench.gz), built for sm_90a (PEERS.md says how).
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=${MOEX_DEVICE_DIR:-.device/cuda}  # own dirs per engineer: MOEX_DEVICE_DIR=.device/x MOEX_DEVICE_BUILD=build/x

# A fingerprint of the sources the binaries are built from (code and CMake files under the source folders), the
# same here and in the tree the run tool copies there: prepare records it, and every subcommand there compares it
# with its tree's, so that binaries left from other sources (a revert or an edit after prepare) stop the call
# before it spends device time on them. MOEX_DEVICE_STALE_OK=1 runs them anyway.
source_id() {
  python3 - <<'PY' 2>/dev/null
import hashlib, os
paths = ["CMakeLists.txt"]
for top in ("src", "apps", "tests", "bench", "tools/kernel_trace"):
    for folder, _, files in os.walk(top):
        paths += [os.path.join(folder, f) for f in files
                  if f == "CMakeLists.txt" or f.endswith((".cc", ".h", ".cu", ".cuh", ".cpp", ".cmake"))]
digest = hashlib.sha256()
for path in sorted(paths):
    with open(path, "rb") as f:
        digest.update(path.encode() + b"\0" + f.read() + b"\0")
print(digest.hexdigest()[:16])
PY
}

prepare() {
  local build=${MOEX_DEVICE_BUILD:-build/cuda-dev}
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEX_CUDA=ON \
    -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc >/dev/null || exit 1
  cmake --build "$build" --target cuda_tests moex_cuda_kernels_bench moex moex_kernel_trace -j2 || exit 1
  rm -rf "$DEV" && mkdir -p "$DEV/bin" "$DEV/lib"
  # The kernel timeline (trace subcommand) and the CUPTI it links: loaded through CUDA_INJECTION64_PATH there.
  cp "$build/tools/kernel_trace/libmoex_kernel_trace.so" "$DEV/lib/" && strip "$DEV/lib/libmoex_kernel_trace.so"
  ldd "$build/tools/kernel_trace/libmoex_kernel_trace.so" | awk '/libcupti/ {print $3}' | xargs -r -I{} cp -Ln {} "$DEV/lib/"
  for bin in "$build/tests/cuda_tests" "$build/bench/moex_cuda_kernels_bench" "$build/moex"; do
    cp "$bin" "$DEV/bin/" && strip "$DEV/bin/$(basename "$bin")"
    ldd "$bin" | awk '/=> \// {print $3}' | grep -vE '/(libc|libm|libpthread|libdl|librt)\.so' |
      xargs -r -I{} cp -Ln {} "$DEV/lib/"
  done
  # Compressed: the tree and the carried paths travel within 64 MiB; every subcommand unpacks them there.
  gzip -9 -f "$DEV"/bin/*
  source_id >"$DEV/source_id"
  du -sh "$DEV"
}

# Unpacks prepare's compressed binaries (and a baseline's) in place.
unpack() {
  local dir built here
  built=$(cat "$DEV/source_id" 2>/dev/null) here=$(source_id)
  if [ -z "$here" ]; then
    echo "device_cuda.sh: warning: no python3 to fingerprint the sources; $DEV not checked against them" >&2
  elif [ "$built" != "$here" ]; then
    echo "device_cuda.sh: $DEV was built from other sources (${built:-no fingerprint}) than this tree's ($here):" \
      "run tools/device_cuda.sh prepare again (MOEX_DEVICE_STALE_OK=1 runs them anyway)" >&2
    [ "${MOEX_DEVICE_STALE_OK:-0}" = 1 ] || exit 1
  fi
  for dir in "$DEV/bin" "${BASELINE:+$BASELINE/bin}"; do
    [ -n "$dir" ] && [ -d "$dir" ] || continue
    for gz in "$dir"/*.gz; do
      [ -e "$gz" ] && gunzip -f "$gz" && chmod +x "${gz%.gz}"
    done
  done
  return 0
}

# The whole CUDA suite's limit: it ran 254 s on an H200 (2026-11-29; a 240 s limit stopped it at test 255 of 266).
CUDA_TESTS_LIMIT_S=${MOEX_CUDA_TESTS_LIMIT_S:-360}

# cuda_tests (the fixtures from tests/fixtures) with its output in LOG; its exit status and failures printed.
#   cuda_tests_to LOG TIMEOUT_S [gtest flags...]
cuda_tests_to() {
  local log=$1 limit=$2 status
  shift 2
  MOEX_FIXTURES_DIR="$PWD/tests/fixtures" timeout "$limit" "$DEV/bin/cuda_tests" --gtest_brief=1 "$@" >"$log" 2>&1
  status=$?
  if [ "$status" -eq 124 ]; then
    echo "cuda_tests exit 124: stopped at its ${limit} s limit, not a test failure ($log; MOEX_CUDA_TESTS_LIMIT_S)"
  else
    echo "cuda_tests exit $status ($log)"
  fi
  grep -E "FAILED|PASSED|Failure" "$log" | head -20
}

ab() {
  local out="${OUT:-/tmp/moex_device_out}" base="${BASELINE:-}" quick=0 skip_tests=0 variants=() screen_batches=8,24,32
  while [ $# -gt 0 ]; do
    case "$1" in
      --variant) variants+=("$2"); shift ;;  # NAME=VALUE[,NAME=VALUE]: this build with an A/B switch, as its own column
      --quick) quick=1 ;;                    # batch-1 decode and the 8x7B layer only (no batched decode, no prefill)
      --screen) quick=2 ;;                   # batch-1 decode of Model A and the 12-layer Model B, every build twice
      --screen-batched) quick=3 ;;           # the same for batched decode at 8, 24 and 32 sequences
      --batches) screen_batches="$2"; shift ;;  # --screen-batched's sequence counts (comma-separated)
      --skip-tests) skip_tests=1 ;;
      *) echo "device_cuda.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
  done
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$DEV/lib:${LD_LIBRARY_PATH:-}"
  nvidia-smi -L
  python3 -c "
import torch, time
x = torch.empty(1 << 31, dtype=torch.uint8, device='cuda'); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize(); print('hbm_copy_gbs %.0f' % (20 * 2 * (1 << 31) / (time.perf_counter() - t) / 1e9))" |
    tee "$out/hbm.txt"
  [ "$skip_tests" -eq 0 ] && cuda_tests_to "$out/tests.log" "$CUDA_TESTS_LIMIT_S"
  local builds="new"
  [ -n "$base" ] && [ -x "$base/bin/moex" ] && builds="new base new base"
  : >"$out/ab.jsonl"
  # Variant v<i> runs this build with variants[i]'s environment.
  local i vbuilds=""
  for i in "${!variants[@]}"; do vbuilds="$vbuilds v$i"; done
  builds="$builds$vbuilds"
  one() {  # build case model flags...: appends {"build", "case", result} to ab.jsonl; model: a path under bench/
    local build=$1 name=$2 model=$3 bin="$DEV/bin/moex" env=()
    shift 3
    [ "$build" = base ] && bin="$base/bin/moex"
    [[ "$build" == v* ]] && IFS=, read -r -a env <<<"${variants[${build#v}]}"
    env "${env[@]}" timeout 150 "$bin" bench -m "bench/$model" --load-format random --device cuda "$@" --json 2>>"$out/err.log" |
      python3 -c "import json, sys
try: r = json.load(sys.stdin)
except Exception: r = {}
print(json.dumps({'build': sys.argv[1], 'case': sys.argv[2], 'r': r}))" "$build" "$name" >>"$out/ab.jsonl"
  }
  local build
  local decode=(--prompt-lens 16 --decode-context 16) prefill=(--prompt-lens 512,2048 --decode-tokens 0 --reps 3)
  if [ "$quick" -eq 2 ]; then
    # Screening switches: Model B's per-layer work in a quarter of its load time (bench/cuda/models/model_b_l12),
    # builds interleaved twice so that drift shows.
    for build in $builds $builds; do
      one "$build" model_a cuda/models/model_a "${decode[@]}" --decode-tokens 64 --reps 3
      one "$build" model_b_l12 cuda/models/model_b_l12 "${decode[@]}" --decode-tokens 64 --reps 3
    done
  fi
  if [ "$quick" -eq 3 ]; then
    # Screening switches of the batched kernels (2-32 tokens a step): the same interleaving.
    for build in $builds $builds; do
      one "$build" batched_a cuda/models/model_a "${decode[@]}" --decode-tokens 32 --reps 2 --batch "$screen_batches"
      one "$build" batched_b_l12 cuda/models/model_b_l12 "${decode[@]}" --decode-tokens 32 --reps 2 \
        --batch "$screen_batches"
    done
  fi
  for build in $builds; do
    [ "$quick" -ge 2 ] && break
    one "$build" model_a cuda/models/model_a "${decode[@]}" --decode-tokens 64 --reps 3
    one "$build" model_b cuda/models/model_b "${decode[@]}" --decode-tokens 64 --reps 3
    [ "$quick" -eq 1 ] || one "$build" batched_a cuda/models/model_a "${decode[@]}" --decode-tokens 32 --reps 2 --batch 1,8,32,128
  done
  for build in ${base:+base} new $vbuilds; do
    [ "$quick" -ge 2 ] && break
    one "$build" layer_1 cuda/models/mixtral_8x7b_l1 "${decode[@]}" --decode-tokens 64 --reps 3
    one "$build" layer_3 cuda/models/mixtral_8x7b_l3 "${decode[@]}" --decode-tokens 64 --reps 3
    [ "$quick" -eq 1 ] && continue
    one "$build" "prefill Model A" cuda/models/model_a "${prefill[@]}"
    one "$build" "prefill Model B" cuda/models/model_b "${prefill[@]}"
    one "$build" "prefill 4-layer 8x7B, 6 GiB" offload/models/mixtral_8x7b_l4 --gpu-memory 6GiB "${prefill[@]}"
  done
  python3 - "$out" "${variants[@]}" <<'PY'
import collections, json, sys
out, variants = sys.argv[1], sys.argv[2:]
hbm = float(open(f"{out}/hbm.txt").read().split()[-1])
rows = collections.defaultdict(list)
for line in open(f"{out}/ab.jsonl"):
    e = json.loads(line)
    rows[(e["build"], e["case"])].append(e["r"])
def ms(build, case):
    return [r["decode"]["ms_per_token_mean"] for r in rows[(build, case)] if "decode" in r]
print(f"\nHBM (device copy, read + written): {hbm:.0f} GB/s")
print("| case | this build ms/token | baseline ms/token | floor ms | % of roofline (this build) |")
print("|---|---|---|---|---|")
for case in ("model_a", "model_b", "model_b_l12"):
    if not any(c == case for _, c in rows): continue
    new, base = ms("new", case), ms("base", case)
    r = next((r for r in rows[("new", case)] if "decode" in r), None)
    floor = r["decode_bytes_per_token"] / (hbm * 1e6) if r else None
    fmt = lambda v: " / ".join(f"{x:.4f}" for x in v) or "-"
    pct = f"{100 * floor / min(new):.0f}%" if floor and new else "-"
    print(f"| {case} | {fmt(new)} | {fmt(base)} | {floor or 0:.3f} | {pct} |")
    for i, v in enumerate(variants):
        print(f"| {case}, {v} | {fmt(ms(f'v{i}', case))} | | | |")
for case, label in (("batched_a", "Model A"), ("batched_b_l12", "Model B, 12 layers")):
    for build in ["new", "base"] + [f"v{i}" for i in range(len(variants))]:
        name = variants[int(build[1:])] if build.startswith("v") else build
        for r in rows[(build, case)]:
            line = " | ".join(f"b{b['batch']} {b['tokens_per_s']:.0f} tok/s" for b in r.get("batch_decode") or [])
            print(f"batched {label}, {name}: {line or 'failed'}")
for build in ["new", "base"] + [f"v{i}" for i in range(len(variants))]:
    l1, l3 = rows[(build, "layer_1")], rows[(build, "layer_3")]
    if l1 and l3 and "decode" in l1[0] and "decode" in l3[0]:
        per = (l3[0]["decode"]["ms_per_token_mean"] - l1[0]["decode"]["ms_per_token_mean"]) / 2
        floor = (l3[0]["decode_bytes_per_token"] - l1[0]["decode_bytes_per_token"]) / 2 / (hbm * 1e6)
        pct = f"{100 * floor / per:.0f}%" if per > 0 else "-"
        name = variants[int(build[1:])] if build.startswith("v") else build
        print(f"8x7B layer, {name}: {per:.4f} ms, floor {floor:.4f} ms, {pct} of roofline")
for case in sorted({c for _, c in rows if c.startswith("prefill")}):
    for build in ("new", "base"):
        for r in rows[(build, case)]:
            line = ", ".join(f"{p['prompt_tokens']}: {p['tokens_per_s']:.0f}" for p in r.get("prefill") or []) or "failed"
            print(f"{case}, {build}: tokens/s {line}")
PY
}

run() {
  local skip_tests=0 skip_kernels=0 skip_bench=0 skip_layer=0 skip_batch=0 models="model_a model_b" tokens=128
  while [ $# -gt 0 ]; do
    case "$1" in
      --skip-tests) skip_tests=1 ;;
      --skip-kernels) skip_kernels=1 ;;
      --skip-bench) skip_bench=1 ;;
      --skip-layer) skip_layer=1 ;;
      --skip-batch) skip_batch=1 ;;
      --models) models="$2"; shift ;;
      --tokens) tokens="$2"; shift ;;
      *) echo "device_cuda.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
  done
  local out="${OUT:-/tmp/moex_device_out}"
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$DEV/lib:${LD_LIBRARY_PATH:-}"
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version --format=csv \
    | tee "$out/device.txt"
  if [ "$skip_tests" -eq 0 ]; then
    echo "== cuda_tests"
    cuda_tests_to "$out/tests.log" "$CUDA_TESTS_LIMIT_S" | head -n 1  # its exit line; the details next
    grep -E "^\[fixture|FAILED|PASSED|SKIPPED|tests ran|Failure|Expected|Which is|max abs" "$out/tests.log" | head -60
  fi
  if [ "$skip_kernels" -eq 0 ]; then
    echo "== kernels"
    timeout 240 "$DEV/bin/moex_cuda_kernels_bench" --json "$out/kernels.jsonl" 2>&1 | tee "$out/kernels.log"
  fi
  local prompt_ids
  prompt_ids=$(seq -s, 11 18)
  for model in $models; do
    echo "== $model"
    nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw,memory.used --format=csv,noheader,nounits -lms 100 \
      >"$out/smi_$model.csv" 2>/dev/null &
    local smi=$!
    timeout 300 "$DEV/bin/moex" run -m "bench/cuda/models/$model" --load-format random --device cuda \
      --prompt-ids "$prompt_ids" -n "$tokens" --temperature 0 --ignore-eos --json >"$out/moex_$model.json" \
      2>"$out/moex_$model.err"
    echo "moex exit $? $(head -c 300 "$out/moex_$model.err")"
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    # Two processes: the first on a fresh machine measured 1.6-2.3x slower than the next (H200); the table takes
    # the faster.
    local attempt
    for attempt in 1 2; do
      timeout 300 python3 bench/peers/transformers_decode.py "bench/cuda/models/$model" --tokens 32 \
        --json "$out/peers.jsonl" >"$out/peer_$model.log" 2>&1
      echo "transformers exit $? $(tail -c 300 "$out/peer_$model.log")"
    done
  done
  if [ "$skip_bench" -eq 0 ]; then
    local hbm
    hbm=$(python3 -c "import json,sys
for l in open(sys.argv[1]):
    k = json.loads(l)
    if k.get('name') == 'hbm_copy': print(round(k['gbs']))" "$out/kernels.jsonl" 2>/dev/null)
    hbm=${hbm:-4000}
    for model in $models; do
      echo "== bench $model (HBM $hbm GB/s)"
      timeout 300 "$DEV/bin/moex" bench -m "bench/cuda/models/$model" --load-format random --device cuda \
        --prompt-lens 512,2048 --decode-tokens 64 --reps 3 --bandwidth-gbs "$hbm" --json \
        >"$out/bench_$model.json" 2>"$out/bench_$model.err"
      echo "bench exit $? $(head -c 400 "$out/bench_$model.json")"
      MOEX_CUDA_GRAPHS=0 timeout 300 "$DEV/bin/moex" bench -m "bench/cuda/models/$model" --load-format random \
        --device cuda --prompt-lens 16 --decode-tokens 64 --reps 3 --bandwidth-gbs "$hbm" --json \
        >"$out/bench_eager_$model.json" 2>"$out/bench_eager_$model.err"
      echo "eager bench exit $? $(head -c 400 "$out/bench_eager_$model.json")"
      # A/B in the same call: kernels launched plainly (no programmatic dependent launch), and the previous
      # build when BASELINE names its dir (bin/moex + lib/, e.g. a stripped copy of the last committed build).
      MOEX_CUDA_PDL=0 timeout 300 "$DEV/bin/moex" bench -m "bench/cuda/models/$model" --load-format random \
        --device cuda --prompt-lens 16 --decode-tokens 64 --reps 3 --bandwidth-gbs "$hbm" --json \
        >"$out/bench_nopdl_$model.json" 2>"$out/bench_nopdl_$model.err"
      echo "no-PDL bench exit $? $(head -c 300 "$out/bench_nopdl_$model.json")"
      if [ -n "${BASELINE:-}" ] && [ -x "$BASELINE/bin/moex" ]; then
        LD_LIBRARY_PATH="$PWD/$BASELINE/lib:$PWD/$DEV/lib" timeout 300 "$BASELINE/bin/moex" bench -m "bench/cuda/models/$model" \
          --load-format random --device cuda --prompt-lens 16 --decode-tokens 64 --reps 3 --bandwidth-gbs "$hbm" \
          --json >"$out/bench_baseline_$model.json" 2>"$out/bench_baseline_$model.err"
        echo "baseline bench exit $? $(head -c 300 "$out/bench_baseline_$model.json")"
      fi
    done
    if [ "$skip_batch" -eq 0 ]; then
      for model in $models; do
        echo "== batched decode $model"
        timeout 300 "$DEV/bin/moex" bench -m "bench/cuda/models/$model" --load-format random --device cuda \
          --prompt-lens 16 --decode-context 16 --decode-tokens 64 --reps 3 --batch 1,8,32,128 --json \
          >"$out/bench_batch_$model.json" 2>"$out/bench_batch_$model.err"
        echo "batched bench exit $? $(tail -c 300 "$out/bench_batch_$model.err")"
      done
    fi
    if [ "$skip_layer" -eq 0 ]; then
      for model in mixtral_8x7b_l1 mixtral_8x7b_l3; do
        echo "== bench $model"
        timeout 300 "$DEV/bin/moex" bench -m "bench/cuda/models/$model" --load-format random --device cuda \
          --prompt-lens 16 --decode-tokens 64 --reps 3 --bandwidth-gbs "$hbm" --json \
          >"$out/bench_$model.json" 2>"$out/bench_$model.err"
        echo "bench exit $? $(head -c 400 "$out/bench_$model.json") $(tail -c 300 "$out/bench_$model.err")"
      done
    fi
  fi
  python3 - "$out" $models <<'PY'
import json, os, sys
out, models = sys.argv[1], sys.argv[2:]
def jl(path):
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []
kern = jl(f"{out}/kernels.jsonl")
hbm = next((k["gbs"] for k in kern if k.get("name") == "hbm_copy"), None)
device = next((k.get("device") for k in kern if k.get("name") == "hbm_copy"), "?")
peers = {}  # model -> its fastest transformers run
for p in jl(f"{out}/peers.jsonl"):
    name = os.path.basename(p["model_dir"].rstrip("/"))
    if p.get("ms_per_token") and (name not in peers or p["ms_per_token"] < peers[name]["ms_per_token"]):
        peers[name] = p
def active_bytes(c):
    h, d = c["hidden_size"], c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    attn = h * d * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    experts = c.get("num_local_experts", c.get("num_experts"))
    ffn = c.get("moe_intermediate_size", c["intermediate_size"])
    per_layer = attn + experts * h + c["num_experts_per_tok"] * 3 * h * ffn
    return 2 * (c["num_hidden_layers"] * per_layer + c["vocab_size"] * h)
f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
print("\n| model | moex ms/token | floor ms (bytes/HBM) | % of roofline | transformers eager ms/token | speedup | GPU util % | W | J/token |")
print("|---|---|---|---|---|---|---|---|---|")
for m in models:
    cfg = json.load(open(f"bench/cuda/models/{m}/config.json"))
    res = jl(f"{out}/moex_{m}.json")
    ms = None
    if res:
        st = res[0]["stats"]
        ms = 1000.0 / st["decode_tokens_per_s"] if st.get("decode_tokens_per_s") else None
    floor = active_bytes(cfg) / (hbm * 1e9) * 1e3 if hbm else None
    util = watts = None
    if os.path.exists(f"{out}/smi_{m}.csv"):
        rows = [r.split(",") for r in open(f"{out}/smi_{m}.csv") if r.count(",") >= 3]
        busy = [r for r in rows if r[1].strip().isdigit() and int(r[1]) > 0]
        if busy:
            util = sum(float(r[1]) for r in busy) / len(busy)
            watts = sum(float(r[2]) for r in busy) / len(busy)
    peer = peers.get(m, {}).get("ms_per_token")
    print(f"| {m} | {f(ms)} | {f(floor)} | {f(floor / ms * 100 if ms and floor else None, 0)} | {f(peer, 1)} | "
          f"{f(peer / ms if peer and ms else None, 1)} | {f(util, 0)} | {f(watts, 0)} | "
          f"{f(watts * ms / 1e3 if watts and ms else None)} |")
print(f"\ndevice: {device}; HBM (device copy, read+write): {f(hbm, 0)} GB/s")
def bench(name):
    path = f"{out}/bench_{name}.json"
    try:
        return json.load(open(path))
    except Exception:
        return None
print("\n| model | decode ms/token (graphs) | eager ms/token | no PDL ms/token | baseline build ms/token | floor ms | % of roofline | prefill 512 tok/s | prefill 2048 tok/s |")
print("|---|---|---|---|---|---|---|---|---|")
for m in models:
    b, e, n, base = bench(m), bench("eager_" + m), bench("nopdl_" + m), bench("baseline_" + m)
    if not b:
        continue
    ms = b["decode"]["ms_per_token_mean"]
    floor = b["decode_bytes_per_token"] / (hbm * 1e9) * 1e3 if hbm else None
    pre = {p["prompt_tokens"]: p["tokens_per_s"] for p in b["prefill"]}
    dec = lambda r: r["decode"]["ms_per_token_mean"] if r else None
    print(f"| {m} | {f(ms)} ± {f(b['decode']['ms_per_token_stddev'])} | {f(dec(e))} | {f(dec(n))} | {f(dec(base))} | "
          f"{f(floor)} | {f(floor / ms * 100 if floor else None, 0)} | {f(pre.get(512), 0)} | {f(pre.get(2048), 0)} |")
# llama.cpp batched decode (../shared/PEERS.md): Model A only, tokens/s at 1 / 8 / 32 sequences.
llama = {"H200": {1: 1061, 8: 3991, 32: 11052}, "H100": {1: 977, 8: 3364, 32: 10199}}
smi = open(f"{out}/device.txt").read() if os.path.exists(f"{out}/device.txt") else ""
card = next((c for c in ("H200", "H100") if c in str(device) or c in smi), None)
rows = [(m, r) for m in models for r in ((bench("batch_" + m) or {}).get("batch_decode") or [])]
if rows:
    print(f"\n| model | sequences | ms/step | tokens/s | host argmax ms/step | llama.cpp tokens/s ({card or '?'}, PEERS.md) | moex / llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for m, r in rows:
        peer = llama.get(card, {}).get(r["batch"]) if m == "model_a" else None
        print(f"| {m} | {r['batch']} | {f(r['ms_per_step_mean'])} ± {f(r['ms_per_step_stddev'])} | {f(r['tokens_per_s'], 0)} | "
              f"{f(r['host_pick_ms_per_step'])} | {f(peer, 0)} | {f(r['tokens_per_s'] / peer if peer else None, 2)} |")
l1, l3 = bench("mixtral_8x7b_l1"), bench("mixtral_8x7b_l3")
if l1 and l3:
    per_ms = (l3["decode"]["ms_per_token_mean"] - l1["decode"]["ms_per_token_mean"]) / 2
    per_bytes = (l3["decode_bytes_per_token"] - l1["decode_bytes_per_token"]) / 2
    floor = per_bytes / (hbm * 1e9) * 1e3 if hbm else None
    print(f"\n8x7B-shaped layer (3-layer minus 1-layer decode, / 2): {per_ms:.4f} ms, floor {f(floor, 4)} ms "
          f"({per_bytes / 1e6:.0f} MB), {f(floor / per_ms * 100 if floor else None, 0)}% of roofline; "
          f"1-layer {l1['decode']['ms_per_token_mean']:.4f} ms, 3-layer {l3['decode']['ms_per_token_mean']:.4f} ms")
PY
}

profile() {
  local models="model_a" batches="1" limit=120
  while [ $# -gt 0 ]; do
    case "$1" in
      --models) models="$2"; shift ;;
      --batch) batches="$2"; shift ;;
      --timeout) limit="$2"; shift ;;
      *) echo "device_cuda.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
  done
  local out="${PROFILE_DIR:-/tmp/moex_ncu}" ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "device_cuda.sh profile: ncu not found" >&2; exit 1; }
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$DEV/lib:${LD_LIBRARY_PATH:-}"
  for model in $models; do
    for batch in $batches; do
      local batch_flag=(--batch "$batch")
      [ "$batch" = 1 ] && batch_flag=()  # batch 1 takes the single-sequence decode path
      for steps in 1 3; do
        # Eager launches: a recorded step replays the same kernels.
        MOEX_CUDA_GRAPHS=0 timeout "$limit" "$ncu" --clock-control none --cache-control none \
          --metrics gpu__time_duration.sum --csv --page raw --print-units base --print-kernel-base function \
          "$DEV/bin/moex" bench -m "bench/cuda/models/$model" --load-format random --device cuda \
          --prompt-lens 16 --decode-context 16 --decode-tokens "$steps" --reps 1 --warmup 0 "${batch_flag[@]}" \
          >"$out/ncu_${model}_b${batch}_s${steps}.csv" 2>"$out/ncu_${model}_b${batch}_s${steps}.err"
        echo "ncu $model batch $batch steps $steps: exit $? $(tail -c 200 "$out/ncu_${model}_b${batch}_s${steps}.err")"
      done
      python3 - "$out/ncu_${model}_b${batch}_s1.csv" "$out/ncu_${model}_b${batch}_s3.csv" "$model batch $batch" <<'PY'
import csv, collections, sys
def load(path):
    rows = [l for l in open(path, errors="replace") if l.startswith('"')]
    per = collections.defaultdict(lambda: [0, 0.0])
    for r in csv.DictReader(rows):
        t = r.get("gpu__time_duration.sum", "").replace(",", "")
        try:
            t = float(t)
        except ValueError:
            continue  # the units row
        k = per[r.get("Kernel Name", "?")]
        k[0] += 1
        k[1] += t / 1e3  # ns -> us
    return per
a, b = load(sys.argv[1]), load(sys.argv[2])
diff = {n: ((b[n][0] - a.get(n, [0, 0])[0]) / 2, (b[n][1] - a.get(n, [0, 0])[1]) / 2) for n in b}
total = sum(t for _, t in diff.values())
print(f"\n{sys.argv[3]}: one decode step = {total:.1f} us of kernel time (sum of Nsight Compute durations), "
      f"{sum(c for c, _ in diff.values()):.0f} launches")
print("| kernel | launches/step | us/step | share |")
print("|---|---|---|---|")
for n, (c, t) in sorted(diff.items(), key=lambda kv: -kv[1][1]):
    if t > 0.002 * total:
        print(f"| {n[:80]} | {c:.1f} | {t:.1f} | {100 * t / total:.1f}% |")
PY
    done
  done
}

# The real decode timeline: CUPTI kernel records (tools/kernel_trace), kernels overlapping as PDL and graphs let
# them. Per case: the run without the tracer (its ms/token, to show the tracer's cost), the traced run, and
# tools/kernel_trace.py's table of each kernel's share of the step's critical path.
trace() {
  local models="model_a model_b" batches="1" tokens=64 extra=() prefill=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --models) models="$2"; shift ;;
      --batch) batches="$2"; shift ;;
      --tokens) tokens="$2"; shift ;;
      --prefill) prefill="${2:-}"; shift
        [[ "$prefill" =~ ^[1-9][0-9]*$ ]] || { echo "device_cuda.sh: --prefill takes a prompt length in tokens" >&2; exit 2; } ;;
      --env) extra+=("$2"); shift ;;  # NAME=VALUE for both runs (an A/B switch such as MOEX_CUDA_PDL=0)
      *) echo "device_cuda.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
  done
  local out="${OUT:-/tmp/moex_device_out}" lib="$PWD/$DEV/lib"
  [ -f "$lib/libmoex_kernel_trace.so" ] || { echo "device_cuda.sh trace: $lib/libmoex_kernel_trace.so missing (prepare)" >&2; exit 1; }
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
  local model batch tag
  for model in $models; do
    for batch in $batches; do
      local batch_flag=(--batch "$batch")
      [ "$batch" = 1 ] && batch_flag=()
      tag="${model}_b${batch}${extra:+_$(echo "${extra[*]}" | tr -c 'A-Za-z0-9\n' _)}"
      local args=(bench -m "bench/cuda/models/$model" --load-format random --device cuda --prompt-lens 16
        --decode-context 16 --decode-tokens "$tokens" --reps 2 "${batch_flag[@]}" --json)
      if [ "$prefill" -gt 0 ]; then  # prompts of $prefill tokens, no decode: the kernels of one prefill
        tag="${model}_prefill${prefill}${extra:+_$(echo "${extra[*]}" | tr -c 'A-Za-z0-9\n' _)}"
        args=(bench -m "bench/cuda/models/$model" --load-format random --device cuda --prompt-lens "$prefill"
          --decode-tokens 0 --reps 2 --json)
        env "${extra[@]}" CUDA_INJECTION64_PATH="$lib/libmoex_kernel_trace.so" MOEX_KERNEL_TRACE="$out/trace_$tag.csv" \
          timeout 150 "$DEV/bin/moex" "${args[@]}" >"$out/traced_$tag.json" 2>>"$out/err.log"
        echo; echo "## $tag ${extra[*]}"
        python3 tools/kernel_trace.py "$out/trace_$tag.csv" --prompts --top 30
        gzip -f "$out/trace_$tag.csv"
        break  # one prefill per model: --batch does not apply
      fi
      env "${extra[@]}" timeout 150 "$DEV/bin/moex" "${args[@]}" >"$out/plain_$tag.json" 2>>"$out/err.log"
      env "${extra[@]}" CUDA_INJECTION64_PATH="$lib/libmoex_kernel_trace.so" MOEX_KERNEL_TRACE="$out/trace_$tag.csv" \
        timeout 150 "$DEV/bin/moex" "${args[@]}" >"$out/traced_$tag.json" 2>>"$out/err.log"
      python3 - "$out/plain_$tag.json" "$out/traced_$tag.json" "$tag ${extra[*]}" "$batch" <<'PY'
import json, sys
def ms(path, batch):
    try:
        r = json.load(open(path))
    except Exception:
        return None
    if batch > 1:  # the batched step's figure, not the batch-1 decode that moex bench runs first
        return next((b["ms_per_step_mean"] for b in r.get("batch_decode") or [] if b.get("batch") == batch), None)
    return (r.get("decode") or {}).get("ms_per_token_mean")
batch = int(sys.argv[4])
what = "ms/step" if batch > 1 else "ms/token"
print(f"\n## {sys.argv[3]}: {what} without the tracer {ms(sys.argv[1], batch)}, traced {ms(sys.argv[2], batch)}")
PY
      if [ "$batch" != 1 ] && [ "$batch" -le 32 ]; then
        # Batched steps of 2-32 rows are CUDA graphs too (decode_rows_step); the benchmark's batch-1 steps before
        # them are others: the batched ones hold the device planner of several tokens.
        python3 tools/kernel_trace.py "$out/trace_$tag.csv" --with moe_plan_tokens_kernel --top 30
        python3 tools/kernel_trace.py "$out/trace_$tag.csv" --with moe_plan_tokens_kernel --by-launch \
          >"$out/launches_$tag.md"
        gzip -f "$out/trace_$tag.csv"
        continue
      fi
      if [ "$batch" != 1 ]; then
        # Batched steps past 32 rows are launched one by one (no graph): a step starts with the embedding and holds
        # the greedy pick (the benchmark's prompts, prefilled one by one, hold no pick: cut at gaps alone, at 32
        # sequences the prompts outnumbered the steps and were reported instead, 2026-11-29). The step's kernels,
        # the idle time inside it and the host's time before it; then every launch in order with the idle time
        # before it.
        local step_cut=(--prompts --common --prompt-gap-us "${MOEX_TRACE_STEP_GAP_US:-1000}" --cut-at embedding_kernel
          --with "${MOEX_TRACE_STEP_WITH:-argmax_merge}")
        python3 tools/kernel_trace.py "$out/trace_$tag.csv" "${step_cut[@]}" --top 30
        python3 tools/kernel_trace.py "$out/trace_$tag.csv" "${step_cut[@]}" --by-launch >"$out/launches_$tag.md"
        gzip -f "$out/trace_$tag.csv"
        continue
      fi
      python3 tools/kernel_trace.py "$out/trace_$tag.csv" --top 30
      python3 tools/kernel_trace.py "$out/trace_$tag.csv" --by-position --top 6
      # Every launch of the step in order, with how early each started (launches_*.md); its first 15 here.
      python3 tools/kernel_trace.py "$out/trace_$tag.csv" --by-launch >"$out/launches_$tag.md"
      head -n 18 "$out/launches_$tag.md"
      gzip -f "$out/trace_$tag.csv"
    done
  done
  # One archive (the run tool brings back at most 8 files from $OUT, and none over its size limit): the launch
  # lists stay beside it, small enough to come back.
  local packed=()
  shopt -s nullglob
  packed=("$out"/plain_*.json "$out"/traced_*.json "$out"/trace_*.csv.gz "$out"/err.log)
  shopt -u nullglob
  [ ${#packed[@]} -gt 0 ] && tar czf "$out/trace.tgz" -C "$out" --remove-files "${packed[@]##*/}" &&
    echo "trace files: $out/trace.tgz"
}

# The opt-in switches (measured once on an H200, 2026-11-27: within 0.4% of the default): their tests, then
# batch-1 decode of Model A and B with each switch (the down preload beside the planning router it needs) against
# the default, interleaved twice in the one call. Make a switch the default only where its tests pass and it is
# faster here.
optin() {
  # The down preload needs the router's launch to plan (MOEX_CUDA_TOPK_IN_GATE_UP=0): compare it with that too.
  local out="${OUT:-/tmp/moex_device_out}" switches=("" "MOEX_CUDA_TOPK_IN_GATE_UP=0"
    "MOEX_CUDA_TOPK_IN_GATE_UP=0 MOEX_CUDA_DOWN_PRELOAD=1")
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$DEV/lib:${LD_LIBRARY_PATH:-}"
  cuda_tests_to "$out/optin_tests.log" 300 \
    --gtest_filter='*RopeInside*:*DownPreload*:*CudaMoeRouted*:*CudaFixture*:*Chained*'
  : >"$out/optin.jsonl"
  local round sw m
  for round in 1 2; do
    for sw in "${switches[@]}"; do
      for m in model_a model_b; do
        env $sw timeout 150 "$DEV/bin/moex" bench -m "bench/cuda/models/$m" --load-format random --device cuda \
          --prompt-lens 16 --decode-context 16 --decode-tokens 64 --reps 3 --gpu-telemetry on --json 2>>"$out/err.log" |
          python3 -c "import json, sys
try: d = json.load(sys.stdin)['decode']
except Exception: d = {}
g = d.get('gpu', {})
print(json.dumps({'switch': sys.argv[1] or 'default', 'model': sys.argv[2], 'ms': d.get('ms_per_token_mean'),
                  'j': g.get('joules_per_token'), 'w': g.get('power_w')}))" "$sw" "$m" >>"$out/optin.jsonl"
      done
    done
  done
  python3 - "$out/optin.jsonl" <<'PY'
import collections, json, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["ms"]: rows[(e["switch"], e["model"])].append(e)
def cell(runs):
    return " / ".join(f"{e['ms']:.4f}" + (f" ({e['j']:.3f} J, {e['w']:.0f} W)" if e.get("j") is not None else "")
                      for e in runs)
print("| switch | Model A ms/token (J/token, W) | Model B ms/token (J/token, W) |\n|---|---|---|")
for sw in dict.fromkeys(k[0] for k in rows):
    print(f"| {sw} | {cell(rows[(sw, 'model_a')])} | {cell(rows[(sw, 'model_b')])} |")
PY
}

# llama.cpp next to moex (see the header). The GGUFs take ~24 GB of the machine's disk (GGUF_DIR).
peers() {
  local out="${OUT:-/tmp/moex_device_out}" llama="${LLAMA_BIN:?LLAMA_BIN: the directory with llama-bench}"
  mkdir -p "$out"
  [ -f "$llama/llama-bench.gz" ] && gunzip -f "$llama/llama-bench.gz" && chmod +x "$llama/llama-bench"
  # llama-bench links cuBLAS/cudart/NCCL dynamically: the machine's CUDA toolkit (or torch's copies) has them.
  local libs="" lib
  for lib in libcublasLt.so.13 libcudart.so.13 libnccl.so.2; do
    libs="$libs:$(dirname "$(find /usr/local /usr/lib /opt $(python3 -c "import site; print(' '.join(site.getsitepackages()))") \
      -name "$lib" 2>/dev/null | head -1)")"
  done
  LD_LIBRARY_PATH="${libs#:}:${LD_LIBRARY_PATH:-}" OUT="$out/llama" LLAMA_BIN="$llama" \
    timeout 400 bench/peers/llama_cpp_bench.sh model_a cpu_experts prefill >"$out/llama.log" 2>&1
  echo "llama_cpp_bench exit $?"
  export LD_LIBRARY_PATH="$PWD/$DEV/lib:${LD_LIBRARY_PATH:-}"
  local moex="$DEV/bin/moex"
  timeout 60 "$moex" bench -m bench/cuda/models/model_a --load-format random --device cuda --prompt-lens 16 \
    --decode-context 16 --decode-tokens 64 --reps 3 --json >"$out/moex_model_a.json" 2>>"$out/err.log"
  timeout 200 "$moex" bench -m bench/offload/models/mixtral_8x7b --load-format random --device cuda --gpu-memory 16GiB \
    --prompt-lens 128 --decode-context 16 --decode-tokens 16 --reps 1 --warmup 0 --predictor pregate --cpu-experts \
    --json >"$out/moex_mixtral.json" 2>>"$out/err.log"
  timeout 100 "$moex" bench -m bench/offload/models/mixtral_8x7b_l4 --load-format random --device cuda \
    --gpu-memory 6GiB --prompt-lens 512,2048 --decode-tokens 0 --reps 2 --warmup 1 --json >"$out/moex_prefill.json" \
    2>>"$out/err.log"
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(name):
    try: return json.load(open(f"{out}/{name}"))
    except Exception: return None
peer = {}
try:
    for line in open(f"{out}/llama/llama_cpp.jsonl"):
        r = json.loads(line); peer[(r["case"], r["metric"])] = r["value"]
except OSError:
    pass
rows = []
a = load("moex_model_a.json"); m = load("moex_mixtral.json"); p = load("moex_prefill.json")
if a and ("model_a", "decode_batch1_ms_per_token") in peer:
    l, x = peer[("model_a", "decode_batch1_ms_per_token")], a["decode"]["ms_per_token_mean"]
    rows.append(("Model A decode batch 1 (ms/token)", l, x, l / x))
if m and ("cpu_experts", "ms_per_token_32_layers") in peer:
    l, x = peer[("cpu_experts", "ms_per_token_32_layers")], m["decode"]["ms_per_token_mean"]
    rows.append(("Mixtral-8x7B decode, experts in host RAM (ms/token)", l, x, l / x))
if p:
    for pre in p["prefill"]:
        key = ("prefill", f'prefill_{pre["prompt_tokens"]}_tokens_per_s')
        if key in peer:
            rows.append((f'4-layer 8x7B prefill {pre["prompt_tokens"]} (tokens/s)', peer[key], pre["tokens_per_s"],
                          pre["tokens_per_s"] / peer[key]))
print("| case | llama.cpp | moex | moex speed-up |\n|---|---|---|---|")
for name, l, x, ratio in rows:
    print(f"| {name} | {l:.4g} | {x:.4g} | {ratio:.2f}x |")
PY
}

# Prefill A/B: this build and its --variant environments interleaved, a tokens/s table last.
prefill() {
  local out="${OUT:-/tmp/moex_device_out}" models="model_a model_b" timeline=0 skip_tests=0 skip_kernels=0 variants=("")
  while [ $# -gt 0 ]; do
    case "$1" in
      --variant) variants+=("$2"); shift ;;
      --models) models=$2; shift ;;
      --timeline) timeline=1 ;;
      --skip-tests) skip_tests=1 ;;
      --skip-kernels) skip_kernels=1 ;;
      *) echo "device_cuda.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
  done
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$DEV/lib:${LD_LIBRARY_PATH:-}"
  nvidia-smi -L
  [ "$skip_tests" -eq 0 ] && cuda_tests_to "$out/prefill_tests.log" 200 \
    --gtest_filter='CudaGemm.*:CudaCublas.*:*CudaLinear*:*CudaMoe*:*Routed*'
  : >"$out/prefill.jsonl"
  local rep v m env bin label base="${BASELINE:-}"
  local runs=("${!variants[@]}")
  [ -n "$base" ] && [ -x "$base/bin/moex" ] && runs+=(base)  # BASELINE's build, as is
  for rep in 1 2; do
    for v in "${runs[@]}"; do
      env=() bin="$DEV/bin/moex"
      if [ "$v" = base ]; then
        bin="$base/bin/moex" label="baseline ($base)"
      else
        IFS=, read -r -a env <<<"${variants[$v]}"
        label="${variants[$v]:-this build}"
      fi
      for m in $models; do
        env "${env[@]}" timeout 150 "$bin" bench -m "bench/cuda/models/$m" --load-format random --device cuda \
          --prompt-lens 512,2048 --decode-tokens 0 --reps 3 --json 2>>"$out/prefill_err.log" |
          python3 -c "import json, sys
try: r = json.load(sys.stdin)
except Exception: r = {}
print(json.dumps({'variant': sys.argv[1], 'model': sys.argv[2], 'prefill': r.get('prefill') or []}))" \
            "$label" "$m" >>"$out/prefill.jsonl"
      done
    done
  done
  # The GEMM kernels of each variant and of BASELINE's kernel bench where it has one, alternately, twice.
  if [ "$skip_kernels" -eq 0 ]; then
    for rep in 1 2; do
      for v in "${runs[@]}"; do
        env=() bin="$DEV/bin/moex_cuda_kernels_bench"
        if [ "$v" = base ]; then
          bin="$base/bin/moex_cuda_kernels_bench" label="baseline ($base)"
          [ -x "$bin" ] || continue
        else
          IFS=, read -r -a env <<<"${variants[$v]}"
          label="${variants[$v]:-this build}"
        fi
        echo "== GEMM kernels, run $rep: $label"
        env "${env[@]}" timeout 90 "$bin" --gemm-only 2>&1 | grep -E "gemm|GEMM|cuBLAS"
      done
    done
  fi
  for v in "${!variants[@]}"; do
    IFS=, read -r -a env <<<"${variants[$v]}"
    if [ "$skip_kernels" -eq 0 ]; then
      echo "== attention kernels: ${variants[$v]:-this build}"
      env "${env[@]}" timeout 60 "$DEV/bin/moex_cuda_kernels_bench" --attention-only 2>&1 | grep -E "^attention"
    fi
    [ "$timeline" -eq 1 ] || continue
    env "${env[@]}" MOEX_CUDA_TIMELINE="$out/timeline_v$v.csv" timeout 150 "$DEV/bin/moex" bench \
      -m bench/cuda/models/model_b --load-format random --device cuda --prompt-lens 2048 --decode-tokens 0 --reps 2 \
      --json >/dev/null 2>>"$out/prefill_err.log"
    echo "== Model B 2048-token prefill timeline: ${variants[$v]:-this build}"
    python3 tools/cuda_timeline.py "$out/timeline_v$v.csv" 151936 | tail -8
    gzip -f "$out/timeline_v$v.csv"
  done
  python3 - "$out/prefill.jsonl" <<'PY'
import collections, json, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    for p in r["prefill"]:
        runs[(r["model"], p["prompt_tokens"], r["variant"])].append(p["tokens_per_s"])
variants = list(dict.fromkeys(v for _, _, v in runs))
print("| model, prompt | " + " | ".join(variants) + " |")
print("|---" * (len(variants) + 1) + "|")
for model, tokens in dict.fromkeys((m, t) for m, t, _ in runs):
    cells = [" / ".join(f"{x:,.0f}" for x in runs[(model, tokens, v)]) or "-" for v in variants]
    print(f"| {model}, {tokens} | " + " | ".join(cells) + " |")
PY
}

# Here, before the next prepare: binaries of the prepared bundle (compressed, with their source fingerprint) into
# DIR/bin, to run there as BASELINE=DIR against the build after a change that has no switch.
#   keep DIR [NAME...]   NAME: moex, moex_cuda_kernels_bench (default: both)
keep() {
  local dir=${1:?usage: tools/device_cuda.sh keep DIR [moex] [moex_cuda_kernels_bench]} name
  shift
  [ $# -gt 0 ] || set -- moex moex_cuda_kernels_bench
  mkdir -p "$dir/bin" || exit 1
  for name in "$@"; do
    [ -f "$DEV/bin/$name.gz" ] || { echo "device_cuda.sh keep: no $name.gz in $DEV (run prepare first)" >&2; exit 1; }
    cp "$DEV/bin/$name.gz" "$dir/bin/" || exit 1
  done
  cp "$DEV/source_id" "$dir/source_id" && du -sh "$dir"
}

case "${1:-}" in
  prepare) prepare ;;
  keep) shift; keep "$@" ;;
  prefill) shift; unpack; prefill "$@" ;;
  peers) shift; unpack; peers "$@" ;;
  run) shift; unpack; run "$@" ;;
  ab) shift; unpack; ab "$@" ;;
  profile) shift; unpack; profile "$@" ;;
  trace) shift; unpack; trace "$@" ;;
  optin) shift; unpack; optin "$@" ;;
  *) sed -n "2,$(( $(grep -n '^set -uo' "$0" | cut -d: -f1) - 1 ))p" "$0"; exit 2 ;;
esac
