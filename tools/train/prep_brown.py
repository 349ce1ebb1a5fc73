#!/usr/bin/env python3
"""Turns the tagged Brown corpus (form C, `word/tag` tokens) into plain-text documents.

Output: one JSON object per line and per Brown file:
  {"id": "ca01", "genre": "news", "split": "train"|"heldout", "paragraphs": ["...", ...]}
Every 20th file (index 10, 30, ... in sorted order) is held out, so the 5% held-out set spans all genres.
Standard library only: it runs on any machine that has npm's tarball.
"""

import json
import os
import re
import sys

HELDOUT_EVERY = 20
HELDOUT_OFFSET = 10

# Brown writes quotes as `` '' ` ' tokens and splits punctuation off words; these rules glue it back.
NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%", "''", "'", "'s", "n't"}
NO_SPACE_AFTER = {"(", "[", "{", "$", "``", "`"}
QUOTES = {"``": '"', "''": '"', "`": "'"}


def words_of(line):
    """Words and tags of one tagged line; tags keep their -hl (headline) and -tl (title) suffixes."""
    out = []
    for item in line.split():
        word, sep, tag = item.rpartition("/")
        if not sep:
            word, tag = item, ""
        out.append((word, tag))
    return out


def is_headline(pairs):
    tagged = [t for _, t in pairs if t]
    return bool(tagged) and sum(t.endswith("-hl") for t in tagged) * 2 > len(tagged)


def detokenize(words):
    text = ""
    glue_next = False
    for word in words:
        piece = QUOTES.get(word, word)
        if word == "." and text.endswith("."):
            continue  # "Jr./np ./." ends a sentence on an abbreviation
        if text and not glue_next and word not in NO_SPACE_BEFORE:
            text += " "
        text += piece
        glue_next = word in NO_SPACE_AFTER
    # Brown doubles some semicolons (";/. ;/.") where it splits a sentence in two.
    text = re.sub(r";( ?;)+", ";", text)
    return re.sub(r"\s+", " ", text).strip()


def paragraphs_of(raw):
    """Paragraphs start with a tab after blank lines; the lines inside one are its sentences."""
    paras, current = [], []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t") and current:
            paras.append(current)
            current = []
        pairs = words_of(line)
        if pairs and not is_headline(pairs):
            current.extend(w for w, _ in pairs)
    if current:
        paras.append(current)
    return [p for p in (detokenize(ws) for ws in paras) if p]


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: prep_brown.py BROWN_DIR OUT.jsonl")
    src, out_path = sys.argv[1], sys.argv[2]
    genres = {}
    with open(os.path.join(src, "cats.txt")) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                genres[parts[0]] = parts[1]
    ids = sorted(genres)
    if len(ids) != 500:
        sys.exit(f"prep_brown.py: {src}/cats.txt lists {len(ids)} files, expected 500")
    counts = {"train": [0, 0], "heldout": [0, 0]}
    with open(out_path, "w") as out:
        for idx, doc_id in enumerate(ids):
            with open(os.path.join(src, doc_id), encoding="utf-8", errors="strict") as f:
                paras = paragraphs_of(f.read())
            split = "heldout" if idx % HELDOUT_EVERY == HELDOUT_OFFSET else "train"
            counts[split][0] += 1
            counts[split][1] += sum(len(p.split()) for p in paras)
            out.write(json.dumps({"id": doc_id, "genre": genres[doc_id], "split": split,
                                  "paragraphs": paras}) + "\n")
    for split, (docs, words) in counts.items():
        print(f"{split}: {docs} documents, {words} words")


if __name__ == "__main__":
    main()
