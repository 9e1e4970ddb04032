#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets: tests/fuzz/corpus/{layout,config,engine}/.

Each seed is a short input in the byte format its target decodes (see the reader calls in
fuzz-<name>.cpp), chosen to reach the accepting paths at once: every layout factory, valid and
borderline configurations, and call sequences that store, retrieve, replace, evict and shut down.
The seeds are committed; rerun this after changing a target's decoding:
    python3 tests/fuzz/make-seeds.py
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


def u16(v):
    return list(struct.pack("<H", v))


# ---- fuzz-layout ------------------------------------------------------------------------------
# kind, num_layers, planes (0: one, 1: two), heads, head_dim, element_bytes, [mla: force byte],
# num_blocks, block_tokens, [pages: stride slack + 16], [strided: 4 x (multiple, slack), extent],
# pointer mode, then rounds: count, ranges, start, (count, gap) per range, table mode, entries...,
# layer_first, layer_count flag, direction.
CONTIGUOUS, FLASH_NHD, FLASH_HND, FI_NHD, FI_HND, MLA, CROSS, CROSS_BO, PAGES, STRIDED = range(10)


def layout_seed(kind, layers, planes2, heads, dim, eb, blocks, bt, extra=(), ptr_mode=0, rounds=()):
    data = [kind, layers, 1 if planes2 else 0, heads, dim, eb]
    if kind == MLA:
        data.append(0)
    data += [blocks, bt]
    data += list(extra)
    data.append(ptr_mode)
    data += list(rounds)
    return data


# One round: one range of `count` tokens from `start`, table mode (0: identity, 1: identity
# written out, 2: reversed), all layers, store or retrieve, then a pattern seed and op splits.
def one_round(start, count, table_mode, store):
    table = [table_mode] + ([0] if table_mode else [])  # non-empty tables: no entry out of range
    return [0, 0, start, count, 0] + table + [0, 0, 1 if store else 0] + [7] + [5, 200, 3, 90] * 4


def layout_seeds():
    w = lambda name, data: write("layout", name, data)
    w("contiguous", layout_seed(CONTIGUOUS, 2, True, 2, 8, 2, 0, 32, rounds=one_round(0, 20, 0, True)))
    w("flash-nhd", layout_seed(FLASH_NHD, 2, True, 2, 8, 2, 6, 4, rounds=one_round(3, 9, 2, False)))
    w("flash-hnd", layout_seed(FLASH_HND, 2, True, 2, 8, 2, 6, 4, rounds=one_round(1, 13, 1, True)))
    w("flashinfer-nhd", layout_seed(FI_NHD, 3, True, 1, 4, 4, 5, 8, rounds=one_round(0, 30, 2, False)))
    w("flashinfer-hnd", layout_seed(FI_HND, 1, True, 3, 2, 1, 4, 3, rounds=one_round(2, 7, 2, True)))
    w("mla", layout_seed(MLA, 2, False, 1, 16, 1, 7, 4, rounds=one_round(0, 17, 1, False)))
    w("cross-layer", layout_seed(CROSS, 3, True, 2, 4, 2, 4, 4, rounds=one_round(0, 12, 2, False)))
    w("cross-layer-blocks-outermost", layout_seed(CROSS_BO, 3, True, 2, 4, 2, 4, 4, rounds=one_round(5, 9, 1, True)))
    w("pages", layout_seed(PAGES, 2, True, 2, 4, 2, 5, 4, extra=[16 + 24], rounds=one_round(0, 16, 2, False)))
    # strided: head, token, block, plane strides as (multiple of the packed unit, slack), then the
    # extent: a selector and the bytes past the packed size (u16)
    w("strided-padded", layout_seed(STRIDED, 2, True, 2, 4, 2, 4, 4,
                                    extra=[1, 0, 1, 6, 2, 0, 2, 0, 0, 0xF4, 0x01], rounds=one_round(0, 14, 2, False)))
    w("strided-hnd", layout_seed(STRIDED, 1, True, 2, 4, 1, 3, 4,
                                 extra=[4, 0, 0, 4, 1, 0, 1, 0, 0, 0, 0], rounds=one_round(1, 10, 2, True)))
    w("aliased-layers", layout_seed(FLASH_NHD, 3, True, 1, 4, 2, 4, 4, ptr_mode=253, rounds=[10]))
    # 2^40 blocks of 8 tokens (the wild size reads its shift from the next byte): stand-in tensors
    w("huge-blocks", [MLA, 1, 0, 1, 8, 1, 0, 0xF1, 40, 8, 0] + [1, 1, 200, 64, 0, 1, 5, 0, 0, 0])
    w("wrong-pointer-count", layout_seed(FLASH_NHD, 2, True, 1, 8, 2, 4, 4, ptr_mode=241))


# ---- fuzz-config ------------------------------------------------------------------------------
# model_id, dtype, layout, salt (each: length, bytes), tp_size, tp_rank, num_layers, planes,
# heads, head_dim, element_bytes (0..3: 1 << v), block_tokens, chunk selector (< 224: a multiple
# of block_tokens) and multiple, capacity selector (< 224: chunks) and chunks, spare flag,
# partial, thread selector (< 224: below(9)), parallel bytes, batch bytes, numa node.
    # split_kv: kind byte 248 (NHD) or 249 (HND); the pointer mode is the counts byte, followed by
    # a placement byte (0: apart; 128: back to back in a Fisher-Yates order, then a gap byte per
    # tensor; 192: anywhere, an offset per tensor; 224: values on keys; 240: all at one address).
    SPLIT_NHD, SPLIT_HND = 248, 249
    split = lambda kind, layers, heads, dim, eb, blocks, bt, counts=0, place=(0,), planes=0, rounds=(): \
        [kind, layers, planes, heads, dim, eb, blocks, bt, counts] + list(place) + list(rounds)
    w("split-kv-nhd", split(SPLIT_NHD, 2, 2, 8, 2, 6, 4, rounds=one_round(3, 9, 2, True)))
    w("split-kv-hnd", split(SPLIT_HND, 3, 3, 4, 1, 5, 4, rounds=one_round(1, 13, 2, False)))
    # k0 v0 k1 v1 back to back: storing the whole cache is one op across all four tensors
    w("split-kv-interleaved-adjacent", split(SPLIT_NHD, 2, 1, 4, 2, 4, 4, place=[128, 3, 2, 1, 0, 0, 0, 0],
                                             rounds=one_round(0, 16, 0, True)))
    w("split-kv-keys-then-values", split(SPLIT_HND, 2, 2, 2, 2, 4, 4, place=[128, 3, 1, 1, 0, 0, 0, 0],
                                         rounds=one_round(0, 16, 1, False)))
    w("split-kv-one-byte-shared", split(SPLIT_NHD, 2, 2, 4, 1, 3, 4, place=[128, 3, 2, 1, 96, 96, 96, 96],
                                        rounds=one_round(2, 8, 2, True)))
    w("split-kv-values-are-keys", split(SPLIT_HND, 2, 2, 4, 2, 3, 4, place=[224], rounds=one_round(0, 12, 1, True)))
    w("split-kv-all-equal", split(SPLIT_NHD, 3, 1, 8, 1, 4, 2, place=[240], rounds=one_round(1, 6, 2, False)))
    w("split-kv-arena", split(SPLIT_NHD, 2, 2, 4, 2, 4, 2, place=[192, 0x10, 0, 0x80, 0, 0x33, 1, 0x00, 2],
                              rounds=one_round(0, 8, 2, True)))
    w("split-kv-keys-short", split(SPLIT_NHD, 2, 2, 8, 2, 6, 4, counts=224))
    w("split-kv-values-extra", split(SPLIT_HND, 2, 2, 8, 2, 6, 4, counts=244))
    w("split-kv-both-short", split(SPLIT_NHD, 3, 2, 8, 2, 6, 4, counts=248))
    w("split-kv-null-value", split(SPLIT_NHD, 2, 2, 8, 2, 6, 4, counts=252, place=[0, 1, 1]))
    w("split-kv-one-plane", split(SPLIT_NHD, 2, 2, 8, 2, 6, 4, planes=225))
    w("split-kv-three-planes", split(SPLIT_HND, 2, 2, 8, 2, 6, 4, planes=227))
    # 2^36 blocks of 2 tokens (1 TiB tensors): fake, disjoint addresses, never dereferenced
    w("split-kv-huge-blocks", [SPLIT_HND, 1, 0, 2, 4, 1, 241, 36, 2, 0, 0] + [1, 1, 0, 0x10, 64, 0, 1, 5, 0, 0, 0])
    # 64 layers and one pointer extra: 65 real tensors (a count the factory must refuse)
    w("sixty-four-layers-one-pointer-extra", [FLASH_NHD, 0xF1, 6, 1, 1, 1, 1, 1, 1, 246, 0, 0, 0, 1, 0, 0, 0, 0, 1])


def config_seed(layers, planes, heads, dim, eb_log, bt, chunk_mult, cap_chunks, partial=0, threads=1,
                parallel=0, batch=0, tp=(1, 0), model=b"m", thread_raw=None, chunk_raw=None):
    data = [len(model)] + list(model) + [0, 0, 0]
    data += [tp[0], tp[1], layers, planes, heads, dim, eb_log, bt]
    data += [0, chunk_mult] if chunk_raw is None else [224, chunk_raw]
    data += [0, cap_chunks, 0]
    data += [partial]
    data += [0, threads] if thread_raw is None else thread_raw
    data += [parallel, batch, 255]
    data += [0x80, 3, 1, 2, 9, 4, 0, 0, 0, 0]  # the round trip: prompt length and seed
    return data


def config_seeds():
    w = lambda name, data: write("config", name, data)
    w("small", config_seed(2, 2, 2, 8, 1, 16, 2, 4))
    w("mla-partial", config_seed(2, 1, 1, 16, 0, 8, 2, 3, partial=1))
    w("threads-8-small-batches", config_seed(3, 2, 1, 4, 2, 4, 4, 6, threads=8, parallel=64, batch=32))
    w("fp64-one-layer", config_seed(1, 2, 3, 5, 3, 3, 3, 2, partial=1, threads=2, parallel=1))
    w("tight-capacity", config_seed(4, 2, 2, 16, 1, 16, 1, 1))
    w("bad-tp-rank", config_seed(2, 2, 2, 8, 1, 16, 2, 4, tp=(2, 2)))
    w("chunk-not-multiple", config_seed(2, 2, 2, 8, 1, 16, 0, 4, chunk_raw=24))
    w("too-many-threads", config_seed(2, 2, 2, 8, 1, 16, 2, 4, thread_raw=[240, 247, 1]))  # 513 + 1
    w("zero-capacity", config_seed(2, 2, 2, 8, 1, 16, 2, 0))


# ---- fuzz-engine ------------------------------------------------------------------------------
# Header: geometry (0: kvt, 1: MLA-like, 2: three layers), partial, capacity chunks - 1, spare flag,
# threads - 1, parallel selector, batch selector, ending. Then calls, each an opcode and its arguments.
STORE, LOOKUP_RETRIEVE, RETRIEVE, BEGIN_STORE, BEGIN_RETRIEVE, SUBMIT_LAYER, SUBMIT_ALL, FINISH, DROP, \
    SAVE, LOAD, CHECK, STATS, RARE = 0, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15
FLASH_NHD_C, FLASH_HND_C, FI_NHD_C, FI_HND_C, MLA_C, PAGES_C, CONTIG_C, CROSS_C, CROSS_BO_C, PADDED_C, ALIASED_C = range(11)


def header(geometry=0, partial=0, chunks=4, threads=1, parallel=0, batch=0, ending=0):
    """ending: bit 0 destroys the engine before its open transfers, bit 1 shuts it down first,
    bits 2 and 3 leave a store and a retrieve in flight."""
    return [geometry, partial, chunks - 1, 0, threads - 1, parallel, batch, ending]


def prompt(base=0, chunks=1, length=None):
    """base 0..3; whole chunks 1..8, or any length 1..256 (approximately) with `length`."""
    if length is not None:
        return [base, 0x80 | min(127, (length - 1) * 127 // 255)]
    return [base, chunks - 1]


def cache(kind=FLASH_NHD_C):
    return [kind, 1]


def table(mode=1, seed=7):
    """mode 0: identity; 1-11: a permutation; 12: a duplicate; 14: out of range; 15: short/long."""
    return [mode, seed] + ([0, 1] if mode in (12, 14) else []) + ([1] if mode == 15 else [])


def key_from(base=0, chunks=1, index=0, size_sel=0):
    return [0] + prompt(base, chunks) + [index, size_sel]


def engine_seeds():
    w = lambda name, data: write("engine", name, data)
    store = lambda p, c=FLASH_NHD_C, t=(1, 7): [STORE] + p + cache(c) + table(*t)
    retrieve = lambda p, c=FLASH_NHD_C, t=(1, 9): [RETRIEVE] + p + cache(c) + table(*t)
    w("store-retrieve", header() + store(prompt(0, 2)) + retrieve(prompt(0, 3)) + [LOOKUP_RETRIEVE] + prompt(0, 2) + [0, 0])
    w("every-cache-kind", header(chunks=6) + sum((store(prompt(k % 4, 1 + k % 3), k % 10) + retrieve(prompt(k % 4, 2), (k + 3) % 10)
                                                  for k in range(10)), []))
    w("layered-out-of-order", header() + [BEGIN_STORE] + prompt(1, 2) + cache(FLASH_HND_C) + table(3, 5)
      + [SUBMIT_LAYER, 0, 1, SUBMIT_LAYER, 0, 0, FINISH, 0]
      + [BEGIN_RETRIEVE] + prompt(1, 2) + cache(PADDED_C) + table(2, 1)
      + [SUBMIT_LAYER, 0, 1, SUBMIT_LAYER, 0, 0, FINISH, 0])
    w("layered-missing-layer", header() + store(prompt(2, 1)) + [BEGIN_RETRIEVE] + prompt(2, 1) + cache() + table()
      + [SUBMIT_LAYER, 0, 1, FINISH, 0] + [BEGIN_STORE] + prompt(3, 1) + cache() + table() + [SUBMIT_LAYER, 0, 0, FINISH, 0])
    w("eviction", header(chunks=2) + store(prompt(0, 2)) + store(prompt(1, 2)) + store(prompt(2, 1))
      + [LOOKUP_RETRIEVE] + prompt(1, 2) + [0, 1] + [LOOKUP_RETRIEVE] + prompt(0, 2) + [0, 0])
    w("partial-chunks-pages", header(geometry=1, partial=1, chunks=3) + store(prompt(0, length=40), PAGES_C)
      + store(prompt(0, length=44)) + retrieve(prompt(0, length=44), PAGES_C) + retrieve(prompt(0, length=40)))
    w("key-api-round-trip", header() + [SAVE, 1] + key_from(0, 2, 0) + key_from(0, 2, 1) + [0]
      + [LOAD, 1] + key_from(0, 2, 0) + key_from(0, 2, 1) + [0] + [CHECK] + prompt(0, 2) + [0]
      + [LOOKUP_RETRIEVE] + prompt(0, 2) + [0, 0])
    w("replace-other-size", header() + [SAVE, 0] + key_from(3, 1, 0, 4) + [20, 0] + store(prompt(3, 2))
      + [LOOKUP_RETRIEVE] + prompt(3, 2) + [0, 0] + [LOAD, 0] + key_from(3, 1, 0, 4) + [20, 0])
    w("made-up-keys", header() + [SAVE, 2, 2, 0, 5, 2, 1, 5, 2, 2, 5, 0] + [LOAD, 1, 2, 0, 5, 2, 1, 5, 0]
      + [LOAD, 0, 2, 4, 5, 0] + [SAVE, 0, 2, 0, 4, 30, 0] + [LOAD, 0, 2, 0, 4, 30, 0])
    w("duplicate-destinations", header() + store(prompt(0, 2)) + retrieve(prompt(0, 2), t=(12, 3))
      + retrieve(prompt(0, 2), ALIASED_C) + [LOAD, 1] + key_from(0, 2, 0) + key_from(0, 2, 1) + [216, 1, 0])
    w("duplicate-sources", header() + store(prompt(1, 3), t=(12, 4)) + store(prompt(2, 2), ALIASED_C)
      + retrieve(prompt(1, 3)) + retrieve(prompt(2, 2)))
    w("bad-tables", header() + store(prompt(0, 2), t=(14, 1)) + retrieve(prompt(0, 2), t=(15, 2))
      + store(prompt(0, 8), CONTIG_C, (0, 0)) + [LOOKUP_RETRIEVE] + prompt(0, 8) + [CONTIG_C, 0])
    w("shutdown-with-open-transfers", header() + store(prompt(0, 1)) + [BEGIN_STORE] + prompt(1, 1) + cache() + table()
      + [BEGIN_RETRIEVE] + prompt(0, 1) + cache() + table() + [SUBMIT_LAYER, 1, 0]
      + [RARE, 0] + [SUBMIT_LAYER, 0, 1, FINISH, 1, FINISH, 0] + store(prompt(2, 1)) + [RARE, 1] + prompt(0, 1) + [STATS, 0, 0])
    w("engine-dies-first", header(ending=1) + store(prompt(1, 1)) + [BEGIN_STORE] + prompt(0, 1) + cache() + table()
      + [SUBMIT_LAYER, 0, 0] + [BEGIN_RETRIEVE] + prompt(1, 1) + cache() + table() + [SUBMIT_ALL, 1])
    w("shutdown-then-engine-dies", header(ending=3) + store(prompt(1, 2)) + [BEGIN_RETRIEVE] + prompt(1, 2) + cache()
      + table() + [SUBMIT_LAYER, 0, 0])
    w("threads-small-batches", header(geometry=2, chunks=6, threads=3, parallel=1, batch=2)
      + store(prompt(0, 4), FI_HND_C) + store(prompt(1, 4), CROSS_BO_C) + retrieve(prompt(0, 4), CROSS_C)
      + retrieve(prompt(1, 4), FLASH_HND_C))
    w("stats-prefixes", header() + store(prompt(0, 1)) + [STATS, 6] + list(b"llm_kv") + [0]
      + [STATS, 3] + list(b"9ab") + [0] + [STATS, 0, 1] + [RARE, 6, 0, 0])
    w("move-engine-with-open-transfer", header() + store(prompt(2, 2)) + [BEGIN_RETRIEVE] + prompt(2, 2) + cache() + table()
      + [RARE, 5] + [SUBMIT_ALL, 0, FINISH, 0] + [RARE, 5] + retrieve(prompt(2, 2)))
    w("tickets-outlive-engine", header(threads=3, parallel=1, ending=1 | 4 | 8) + store(prompt(0, 1))
      + [BEGIN_STORE] + prompt(1, 2) + cache() + table() + [SUBMIT_LAYER, 0, 0])
    w("tickets-outlive-shutdown", header(threads=2, parallel=2, ending=2 | 4 | 8) + store(prompt(0, 1)))
    w("rejections", header() + [RARE, 2] + prompt(0, 1) + [0] + [RARE, 3] + prompt(0, 1) + [RARE, 4]
      + [SAVE, 255, 0, LOAD, 255, 0, CHECK, 0, 255, 0] + [LOOKUP_RETRIEVE, 0, 255])


if __name__ == "__main__":
    layout_seeds()
    config_seeds()
    engine_seeds()
