#!/usr/bin/env python3
"""Times the prefix hashing that vLLM and LMCache do in Python, as the baseline for kvortex's hashers.

Each chunk's key is sha256(pickle.dumps((parent, tokens))).digest(), chained from a root digest,
over an 8192-token prompt cut into 256-token chunks (LMCache's chunk size) and into 16-token
blocks (vLLM's block size). Prints one JSON object of best-of-N microseconds per prompt.
Standard library only, so any python3 runs it.
"""

import argparse
import hashlib
import json
import pickle
import platform
import random
import sys
import timeit

PROMPT_TOKENS = 8192


def chained_sha256(tokens, chunk, root):
    parent = root
    for i in range(0, len(tokens) - len(tokens) % chunk, chunk):
        # vLLM passes each block's token ids as a tuple; LMCache as a list. Tuples are used here.
        parent = hashlib.sha256(pickle.dumps((parent, tuple(tokens[i:i + chunk])))).digest()
    return parent


def best_us(fn, repeat, number):
    # Best of `repeat` runs of `number` calls each: the least disturbed estimate of one call.
    return min(timeit.repeat(fn, repeat=repeat, number=number)) / number * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=7, help="timeit repeats (best is reported)")
    ap.add_argument("--number", type=int, default=200, help="prompts hashed per repeat")
    args = ap.parse_args()

    rng = random.Random(42)
    tokens = [rng.randrange(0, 128256) for _ in range(PROMPT_TOKENS)]
    root = hashlib.sha256(b"root").digest()

    out = {
        "python_chained_sha256_8192_us": best_us(lambda: chained_sha256(tokens, 256, root), args.repeat, args.number),
        "python_chained_sha256_8192_block16_us": best_us(
            lambda: chained_sha256(tokens, 16, root), args.repeat, max(1, args.number // 4)),
        "python": sys.executable,
        "python_version": platform.python_version(),
        "pickle_protocol": pickle.DEFAULT_PROTOCOL,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
