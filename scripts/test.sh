#!/usr/bin/env bash
# Builds everything (tests included) with the release preset and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${MOEX_TEST_PRESET:-cpu-release}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset"
ctest --preset "$preset" -j "$(nproc)" "$@"
