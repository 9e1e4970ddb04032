"""`Engine.lookup` of an 8192-token prompt from Python (host stack, SHA-256 keys, full hit) against
the same call in C++ (`kvortex-bench --benchmark_filter=lookup/sha256/hit/tokens:8192`, run it
beside this). Prints microseconds per call, median of 7 rounds of 2000 calls.

    PYTHONPATH=build/python /usr/bin/python3 benchmarks/python_lookup.py
"""

import statistics
import time

import numpy as np

import kvortex

LAYERS, HEADS, DIM, CHUNK = 2, 2, 8, 256
settings = {
    "capacity_bytes": "64MiB", "chunk_tokens": CHUNK, "block_tokens": 16, "transfer_threads": 1,
    "ns": {"model_id": "bench"},
    "geometry": {"num_layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM},
}
with kvortex.Engine(settings) as e:
    tokens = np.random.default_rng(1).integers(0, 128000, 8192, dtype=np.int32)
    cache = [np.zeros((2, 8192 // 16, 16, HEADS, DIM), dtype=np.float16) for _ in range(LAYERS)]
    e.store(tokens, kvortex.flash_attn_layout(cache)).wait()
    assert e.lookup(tokens) == 8192
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(2000):
            e.lookup(tokens)
        rounds.append((time.perf_counter() - t0) / 2000 * 1e6)
    as_list = tokens.tolist()
    t0 = time.perf_counter()
    for _ in range(200):
        e.lookup(as_list)
    list_us = (time.perf_counter() - t0) / 200 * 1e6
    print(f"python lookup, 8192 tokens (int32 array): {statistics.median(rounds):.2f} us per call; from a list of ints: {list_us:.2f} us")
