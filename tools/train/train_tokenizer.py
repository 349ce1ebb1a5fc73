#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizer of moex's own models on the training split of the corpus.

GPT-2 style pipeline (ByteLevel pre-tokenizer without prefix space, ByteLevel decoder) plus a
TemplateProcessing post-processor that puts BOS first, so encode(text, add_special_tokens=True) behaves
like Llama's. Writes tokenizer.json and tokenizer_config.json into --out.
Usage: train_tokenizer.py --corpus .device/corpus/brown.jsonl --out DIR [--vocab 6144]
"""

import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common import BOS_ID, EOS_ID, SPECIAL_TOKENS, UNK_ID, doc_texts, load_docs, log, write_json

# Not a chat model: the template only frames turns as plain text the model has seen (lines of prose).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def train(corpus, out_dir, vocab):
    train_docs, _ = load_docs(corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(doc_texts(train_docs), trainer)
    for tid, text in ((UNK_ID, "<unk>"), (BOS_ID, "<s>"), (EOS_ID, "</s>")):
        if tok.token_to_id(text) != tid:
            raise RuntimeError(f"special token {text} got id {tok.token_to_id(text)}, expected {tid}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    })
    enc = tok.encode("The old man walked")
    log("tokenizer", f"vocab {tok.get_vocab_size()}; 'The old man walked' -> {enc.ids} {enc.tokens}")
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=6144)
    args = ap.parse_args()
    train(args.corpus, args.out, args.vocab)


if __name__ == "__main__":
    main()
