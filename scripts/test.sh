#!/usr/bin/env bash
# Builds everything (tests included) with the release preset and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${MOEX_TEST_PRESET:-cpu-release}"
# MOEX_CMAKE_ARGS adds configure flags (CI passes -DMOEX_WERROR=ON).
# shellcheck disable=SC2086
cmake --preset "$preset" ${MOEX_CMAKE_ARGS:-} >/dev/null
cmake --build --preset "$preset"
ctest --preset "$preset" -j "$(nproc)" "$@"
