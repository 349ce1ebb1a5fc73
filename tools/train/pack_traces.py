#!/usr/bin/env python3
"""Cuts a full trace (.jsonl.gz from device_run.sh) down to a committed bench/traces/<name>.jsonl.

Keeps whole requests (the prefill line and the decode line that follows it with the same request_id),
evenly spaced over the held-out paragraphs so every held-out document can appear, until --max-bytes.
Standard library only.
Usage: pack_traces.py FULL.jsonl.gz OUT.jsonl --model LABEL [--max-bytes 4000000]
"""

import argparse
import gzip
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("full")
    ap.add_argument("out")
    ap.add_argument("--model", required=True, help="value of the model field in the output")
    ap.add_argument("--max-bytes", type=int, default=4_000_000)
    args = ap.parse_args()
    requests = []
    with gzip.open(args.full, "rt") as f:
        for line in f:
            rec = json.loads(line)
            rec["model"] = args.model
            text = json.dumps(rec, separators=(",", ":")) + "\n"
            if requests and requests[-1][0] == rec["request_id"]:
                requests[-1][1].append(text)
            else:
                requests.append((rec["request_id"], [text]))
    sizes = [sum(len(t) for t in r[1]) for r in requests]
    count = len(requests)
    while count > 0:
        picks = [int(i * len(requests) / count) for i in range(count)]
        if sum(sizes[i] for i in picks) <= args.max_bytes:
            break
        count -= 1
    with open(args.out, "w") as f:
        for i in picks:
            f.writelines(requests[i][1])
    total = sum(sizes[i] for i in picks)
    print(f"{args.out}: {count} of {len(requests)} requests, {total} bytes")


if __name__ == "__main__":
    main()
