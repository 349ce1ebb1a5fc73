#!/usr/bin/env bash
# tools/cubin_compare.py (whether a change leaves CUDA kernels' machine code as it was) on a scratch repository
# with one kernel: a comment that moves every line is "the same", a changed constant "differs", a new kernel is
# "only in the working tree", a header stands for the .cu files that include it, and bad input is an error.
# Needs nvcc and readelf, not a GPU; without them the test is skipped (exit 77).
# Usage: cubin_compare_tool_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"
tool="$src/tools/cubin_compare.py"
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ ! -x "$nvcc" ] || ! command -v readelf >/dev/null || ! command -v git >/dev/null; then
  echo "cubin_compare_tool_test: skipped (needs nvcc, readelf and git)"
  exit 77
fi

repo="$tmp/repo"
mkdir -p "$repo/src/k" "$repo/build"
cat >"$repo/src/k/scale.cuh" <<'EOF'
#pragma once
__device__ __forceinline__ float scale(float v) { return v * 2.f; }
EOF
cat >"$repo/src/k/kernel.cu" <<'EOF'
#include "k/scale.cuh"
__global__ void scale_kernel(float* y, const float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = scale(x[i]);
}
EOF
cat >"$repo/src/k/other.cu" <<'EOF'
__global__ void other_kernel(float* y) { y[threadIdx.x] = 1.f; }
EOF
# compile_commands.json as CMake writes it for the CUDA build: the object command, -lineinfo and -gencode included.
python3 - "$repo" "$nvcc" <<'PY'
import json, sys
repo, nvcc = sys.argv[1:]
entries = [{"directory": f"{repo}/build", "file": f"{repo}/src/k/{name}.cu",
            "command": f"{nvcc} -I{repo}/src -O3 --generate-code=arch=compute_90a,code=[compute_90a,sm_90a] "
                       f"-lineinfo -std=c++17 -MD -MT k/{name}.cu.o -MF k/{name}.cu.o.d -x cu "
                       f"-c {repo}/src/k/{name}.cu -o k/{name}.cu.o"} for name in ("kernel", "other")]
json.dump(entries, open(f"{repo}/build/compile_commands.json", "w"))
PY
git -C "$repo" init -q && git -C "$repo" add src && git -C "$repo" -c user.name=t -c user.email=t@t commit -qm base

run_tool() { (cd "$repo" && python3 "$tool" --build build "$@"); }

# A comment that moves every line below it: the same machine code (line tables are left out).
sed -i '1i // a comment that moves every line' "$repo/src/k/scale.cuh"
if run_tool src/k/scale.cuh >"$tmp/out" 2>"$tmp/err"; then
  grep -q "1 of 1 kernels the same as HEAD" "$tmp/out" && ok || fail "comment: $(cat "$tmp/out")"
else
  fail "comment: exit $?: $(cat "$tmp/out" "$tmp/err")"
fi

# A changed constant, found through the header (only kernel.cu includes it); --json says which kernel.
sed -i 's/2\.f/3.f/' "$repo/src/k/scale.cuh"
run_tool --json src/k/scale.cuh >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ]; then
  python3 - "$tmp/out" <<'PY' && ok || fail "constant: $(cat "$tmp/out")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["same"] is False, r
[k] = r["kernels"]
assert k["file"] == "src/k/kernel.cu" and "scale_kernel" in k["kernel"] and k["state"] == "differs", k
assert 0 < k["instructions_changed"] <= k["instructions"], k
PY
else
  fail "constant: exit $rc, expected 1: $(cat "$tmp/out" "$tmp/err")"
fi
git -C "$repo" checkout -q src

# A kernel added to other.cu, found with no file named (the .cu files changed since the base).
echo '__global__ void new_kernel(float* y) { y[0] = 0.f; }' >>"$repo/src/k/other.cu"
run_tool >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && grep -q "new_kernel.*only in the working tree" "$tmp/out" && grep -q "1 of 2 kernels" "$tmp/out"; then
  ok
else
  fail "new kernel: exit $rc: $(cat "$tmp/out" "$tmp/err")"
fi
git -C "$repo" checkout -q src

expect_error "a file the build does not compile" "is not compiled by the build" run_tool src/k/missing.cu
expect_error "no such revision" "no such revision: nope" run_tool --base nope src/k/kernel.cu
expect_error "nothing changed" "no .cu or .cuh file changed since HEAD" run_tool
expect_error "no build" "cannot read" run_tool --build nowhere src/k/kernel.cu
finish
