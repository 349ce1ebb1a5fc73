# Shared by the e2e scripts (sourced, not a test: ctest runs *_test.sh only). Sets moex and src from the
# arguments every script gets (MOEX_BINARY SOURCE_DIR), a temporary dir removed at exit, and the counters
# behind ok / fail / expect_error; finish prints the tally and sets the exit status.
set -u
moex="$1"
src="$2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
passed=0
e2e_name=$(basename "$0" .sh)

ok() { passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# expect_error NAME EXPECTED_STDERR_SUBSTRING CMD...: non-zero exit below 128 (no signal) and the message.
expect_error() {
  local name="$1" expected="$2"
  shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ $rc -eq 0 ]; then fail "$name: exit 0, expected an error"; return; fi
  if [ $rc -ge 128 ]; then fail "$name: crashed with exit $rc: $(cat "$tmp/err")"; return; fi
  if ! grep -qF -- "$expected" "$tmp/err"; then fail "$name: stderr lacks \"$expected\": $(cat "$tmp/err")"; return; fi
  ok
}

finish() {
  echo "$e2e_name: $passed passed, $failures failed"
  [ "$failures" -eq 0 ]
}
