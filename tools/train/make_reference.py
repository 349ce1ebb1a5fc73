#!/usr/bin/env python3
"""Rewrites reference.json of a saved model directory, computed on the CPU in exact float32.

The GPU path can round float32 matrix products (TF32); a reference must not. Also checks that
transformers' own tokenizer class reads the shipped tokenizer files the way the tokenizers library does.
Usage: make_reference.py --model DIR --name NAME
"""

import argparse
import json
import os

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

import export
import hf_models
from common import log


def check_tokenizer(model_dir, tok):
    hf = AutoTokenizer.from_pretrained(model_dir)
    texts = ["The old man walked", "She said, \"I'm here\" -- and left.\nNext line", "naïve café 1961"]
    res = {}
    for text in texts:
        a, b = tok.encode(text).ids, hf(text)["input_ids"]
        res[text] = dict(ids=a, same_as_transformers=a == b, decode_roundtrip=tok.decode(a) == text)
    chat = hf.apply_chat_template([{"role": "user", "content": "Tell me a story."}], tokenize=False,
                                  add_generation_prompt=True)
    res["chat_template"] = chat
    log("tokenizer", json.dumps(res))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    check_tokenizer(args.model, tok)
    model = hf_models.load_model(args.model, "cpu")
    export.write_reference(model, tok, args.model, args.name)


if __name__ == "__main__":
    main()
