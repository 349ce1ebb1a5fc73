"""Shared pieces of moex's model training: presets, corpus loading, token streams, logging.

Runs on the GPU machine (torch, transformers, tokenizers). See docs/default-model.md.
"""

import json
import os
import sys
import time

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # Llama's ids 0/1/2, so BOS/EOS sit where Mixtral's do

# Model presets. `default_*` compete for models/default (<= 25 MB as bf16 with its tokenizer); the
# routing models exist for their expert traces and stay out of git.
# Training is bound by per-op overhead, not GPU arithmetic: batches are as large as helps (32k tokens).
PRESETS = {
    # 11.0 M parameters each: wide/shallow vs narrow/deep at the same size, and two dropout levels.
    "default_w6": dict(arch="mixtral", hidden=320, layers=6, heads=5, kv_heads=5, head_dim=64, experts=8,
                       top_k=2, ffn=144, tie=True, seq=512, batch=64, lr=2e-3, dropout=0.2),
    "default_d8": dict(arch="mixtral", hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64, experts=8,
                       top_k=2, ffn=160, tie=True, seq=512, batch=64, lr=2e-3, dropout=0.2),
    # Same with a stronger load-balancing loss: short training leaves routers skewed at 0.02.
    "default_d8_bal": dict(arch="mixtral", hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64, experts=8,
                           top_k=2, ffn=160, tie=True, seq=512, batch=64, lr=2e-3, dropout=0.2, aux=0.05),
    "default_d8_drop": dict(arch="mixtral", hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64, experts=8,
                            top_k=2, ffn=160, tie=True, seq=512, batch=64, lr=2e-3, dropout=0.35),
    # Mixtral-8x7B's layout (32 layers, 8 experts, top-2), narrow.
    "routing_mixtral32": dict(arch="mixtral", hidden=128, layers=32, heads=4, kv_heads=2, head_dim=32,
                              experts=8, top_k=2, ffn=256, tie=True, seq=256, batch=128, lr=2e-3, dropout=0.1,
                              aux=0.1),
    # Fine-grained like Qwen3-MoE (64 experts, top-8, small experts), narrow.
    "routing_fine64": dict(arch="qwen3_moe", hidden=128, layers=16, heads=4, kv_heads=2, head_dim=32,
                           experts=64, top_k=8, ffn=64, tie=True, seq=256, batch=128, lr=2e-3, dropout=0.1,
                           aux=0.1),
}
AUX_LOSS_COEF = 0.02  # router_aux_loss_coef unless a preset sets "aux"


def log(tag, *args):
    print(f"[{time.strftime('%H:%M:%S')} {tag}]", *args, flush=True)


def load_docs(corpus_path):
    train, heldout = [], []
    with open(corpus_path) as f:
        for line in f:
            doc = json.loads(line)
            (heldout if doc["split"] == "heldout" else train).append(doc)
    if not train or not heldout:
        sys.exit(f"{corpus_path}: expected train and heldout documents, got {len(train)}/{len(heldout)}")
    return train, heldout


def doc_texts(docs):
    return ["\n".join(d["paragraphs"]) + "\n" for d in docs]


def encode_paragraphs(tok, docs):
    """Per document, the token lists of its paragraphs (each with its trailing newline), no specials.

    The byte-level pre-tokenizer splits at the newline, so encoding paragraph by paragraph gives the same
    ids as encoding the document in one piece.
    """
    out = []
    for doc in docs:
        encs = tok.encode_batch([p + "\n" for p in doc["paragraphs"]], add_special_tokens=False)
        out.append([e.ids for e in encs])
    return out


def token_stream(doc_paras):
    """Flat stream (documents end in EOS) and the offsets where paragraphs start."""
    stream, starts = [], []
    for paras in doc_paras:
        for ids in paras:
            starts.append(len(stream))
            stream.extend(ids)
        stream.append(EOS_ID)
    return stream, starts


def write_json(path, obj, indent=1):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
