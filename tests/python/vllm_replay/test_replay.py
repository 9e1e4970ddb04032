"""KVortexConnector driven through vLLM v0.16.0's call sequence (see harness.py), NumPy caches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

kvortex = pytest.importorskip("kvortex")
from kvortex.vllm import ConfigError, KVConnectorRole, KVortexConnector, parse_options, socket_path  # noqa: E402

from .conftest import prompt  # noqa: E402
from .harness import Replay  # noqa: E402
from .shapes import (CacheConfig, KVCacheConfig, KVTransferConfig, LoRARequest, ModelConfig,  # noqa: E402
                     MultiModalFeatureSpec, ParallelConfig, PlaceholderRange, Request, VllmConfig)

CHUNK = 32
CHUNK_BYTES = CHUNK * 2 * 2 * 2 * 8 * 2  # tokens x layers x planes x heads x dim x 2 bytes


def replay(sockets, **kw) -> Replay:
    return Replay(socket_dir=sockets, **kw)


def finished_clean(r: Replay) -> None:
    """Every block back in vLLM's pool, every held request released."""
    assert r.kv.num_free == r.kv.num_blocks
    assert not r.scheduler.delayed
    assert not r.scheduler.requests


def test_a_shared_prefix_is_served_from_kvortex_when_vllm_has_lost_it(sockets):
    r = replay(sockets, prefix_caching=False)
    shared = prompt(160, 1)
    a = Request("a", shared + prompt(40, 2))
    r.run([a])
    assert r.scheduler.external_hits.get("a", 0) == 0
    computed_a = r.workers[0].computed_tokens
    b = Request("b", shared + prompt(40, 3))
    r.run([b])
    # 5 whole chunks of the shared prefix come from KVortex; the tail is computed.
    assert r.scheduler.external_hits["b"] == 160
    assert r.workers[0].computed_tokens - computed_a == 200 - 160 + 1
    assert r.mismatches("a") == 0 and r.mismatches("b") == 0
    # a's stores held its blocks until the worker reported them done, once per rank.
    assert r.scheduler.reports[("finished_sending", "a")] == 1
    assert r.workers[0].connector.stats["loaded_tokens"] == 160
    finished_clean(r)
    r.close()


def test_kvortex_brings_what_lies_beyond_vllms_own_prefix_cache(sockets):
    r = replay(sockets, prefix_caching=True, num_blocks=96)
    shared = prompt(160, 4)
    a = Request("a", shared + prompt(40, 5))
    r.run([a])
    # vLLM keeps the first 3 blocks (48 tokens) of the prefix; the rest was evicted.
    hashes = r.kv.block_hashes(a, 192)
    for h in hashes[3:]:
        blk = r.kv.cached.pop(h, None)
        if blk is not None:
            r.kv.hash_of[blk] = None
    b = Request("b", shared + prompt(40, 6))
    r.run([b])
    assert r.scheduler.external_hits["b"] == 160 - 48
    assert r.mismatches("b") == 0
    finished_clean(r)
    r.close()


def test_chunked_prefill_stores_chunks_as_their_tokens_are_computed(sockets):
    r = replay(sockets, prefix_caching=False, token_budget=48)
    p = prompt(300, 7)
    r.run([Request("a", p)])
    stores = r.workers[0].connector.stats["stores"]
    assert stores >= 6  # one store per step that completed a chunk
    r.run([Request("b", p[:288] + prompt(20, 8))])
    assert r.scheduler.external_hits["b"] == 288
    assert r.mismatches("a") == 0 and r.mismatches("b") == 0
    finished_clean(r)
    r.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_preempted_requests_resume_from_kvortex(sockets, mode):
    # 30 blocks of 16 tokens cannot hold three 200-token requests that each generate 40 tokens.
    r = replay(sockets, prefix_caching=False, num_blocks=30, token_budget=64, extra={"load_mode": mode})
    reqs = [Request(f"r{i}", prompt(200, 10 + i), max_tokens=40) for i in range(3)]
    r.run(reqs)
    preempted = [q for q in reqs if q.num_preemptions > 0]
    assert preempted, "the pool was meant to force a preemption"
    for q in reqs:
        assert q.num_output_tokens == 40
        assert r.mismatches(q.request_id) == 0
    # A preempted request's blocks were freed at once: the stores still open for it were rolled
    # back (never committed from reused blocks). What it stored once it ran through is served.
    for q in preempted:
        again = Request(q.request_id + "-again", list(q.all_token_ids[:192]) + [5, 5])
        r.run([again])
        assert r.scheduler.external_hits[again.request_id] == 192
        assert r.mismatches(again.request_id) == 0
    finished_clean(r)
    r.close()


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_async_loads_go_through_waiting_for_remote_kvs(sockets, prefix_caching):
    r = replay(sockets, prefix_caching=prefix_caching, extra={"load_mode": "async"})
    shared = prompt(192, 20)
    a = Request("a", shared + prompt(20, 21))
    r.run([a])
    local = 0
    if prefix_caching:  # vLLM keeps a's first 3 blocks; the rest come from KVortex, loaded async
        for h in r.kv.block_hashes(a, 208)[3:]:
            blk = r.kv.cached.pop(h, None)
            if blk is not None:
                r.kv.hash_of[blk] = None
        local = 48
    b = Request("b", shared + prompt(20, 22))
    r.scheduler.add_request(b)
    r.step()
    assert b.status.name == "WAITING_FOR_REMOTE_KVS"
    r.run()
    assert r.scheduler.external_hits["b"] == 192 - local
    assert r.scheduler.reports[("finished_recving", "b")] == 1
    assert r.mismatches("b") == 0
    finished_clean(r)
    r.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_chunks_lost_between_lookup_and_load_are_reported_and_recomputed(sockets, mode):
    r = replay(sockets, prefix_caching=False, extra={"load_mode": mode, "capacity_bytes": CHUNK_BYTES * 6})
    shared = prompt(192, 30)
    r.run([Request("a", shared + prompt(20, 31))])
    b = Request("b", shared + prompt(20, 32))
    r.scheduler.add_request(b)
    w = r.workers[0]

    def evict():  # other prompts fill the engine between the scheduler's lookup and the load
        eng = w.connector.engine()
        if r.scheduler.external_hits.get("b") and not getattr(evict, "done", False):
            evict.done = True
            eng.store(np.asarray(prompt(192, 33), dtype=np.int32), w.connector._layout, list(range(12))).wait()

    while r.scheduler.has_requests():
        r.step(before_forward=evict)
        assert r.steps < 500
    assert getattr(evict, "done", False)
    assert r.scheduler.invalid_blocks_seen, "the lost chunks' blocks were reported"
    assert w.connector.stats["load_failures"] >= 1
    if mode == "sync":
        assert r.scheduler.discarded_steps["b"] >= 1  # vLLM dropped that step and recomputed
    assert b.num_output_tokens == b.max_tokens
    assert r.mismatches("b") == 0
    # What b stored while its blocks held no loaded KV was dropped: a later request that hits
    # the prefix again reads only right bytes.
    c = Request("c", shared + prompt(20, 34))
    r.run([c])
    assert r.scheduler.external_hits.get("c", 0) > 0
    assert r.mismatches("c") == 0
    finished_clean(r)
    r.close()


def test_two_tensor_parallel_ranks_serve_the_minimum_of_their_hits(sockets):
    r = replay(sockets, tp=2, prefix_caching=False, extra={"capacity_bytes": CHUNK_BYTES * 8})
    shared = prompt(192, 40)
    r.run([Request("a", shared + prompt(20, 41))])
    # Rank 1 loses part of the prefix; rank 0 keeps all of it.
    w1 = r.workers[1]
    w1.connector.engine().store(np.asarray(prompt(96, 42), dtype=np.int32), w1.connector._layout, list(range(6))).wait()
    b_tokens = shared + prompt(20, 43)
    h0 = r.workers[0].connector.engine().lookup(np.asarray(b_tokens[:192], dtype=np.int32))
    h1 = w1.connector.engine().lookup(np.asarray(b_tokens[:192], dtype=np.int32))
    assert h0 == 192 and h1 < h0
    b = Request("b", b_tokens)
    r.run([b])
    assert r.scheduler.external_hits.get("b", 0) == h1
    for q in ("a", "b"):
        assert r.mismatches(q) == 0
    assert r.scheduler.reports[("finished_sending", "a")] == 2  # both ranks, once each
    finished_clean(r)
    r.close()


def test_a_failed_load_on_one_rank_never_leaves_wrong_kv_on_another(sockets):
    # Rank 1 loses the prefix between the scheduler's lookup and the load. Its attention reads
    # garbage, and (through the all-reduce) so does every rank's next layer: the chunk computed in
    # that step is wrong on rank 0 too, and must not be committed there.
    r = replay(sockets, tp=2, prefix_caching=False, extra={"capacity_bytes": CHUNK_BYTES * 8})
    shared = prompt(160, 44)
    r.run([Request("a", shared + prompt(40, 45))])
    b = Request("b", shared + prompt(60, 46))
    w1 = r.workers[1]

    def evict():
        if r.scheduler.external_hits.get("b") and not getattr(evict, "done", False):
            evict.done = True
            w1.connector.engine().store(np.asarray(prompt(192, 47), dtype=np.int32), w1.connector._layout,
                                        list(range(12))).wait()

    r.scheduler.add_request(b)
    while r.scheduler.has_requests():
        r.step(before_forward=evict)
        assert r.steps < 500
    assert getattr(evict, "done", False) and r.scheduler.invalid_blocks_seen
    assert r.mismatches("b") == 0
    # b's sixth chunk, as computed over the failed load, was dropped on rank 0; recomputed, it
    # was stored again. A request that reads it gets the right bytes on both ranks.
    c = Request("c", list(b.all_token_ids[:192]) + [3, 3])
    r.run([c])
    assert r.scheduler.external_hits.get("c", 0) == 192
    assert r.mismatches("c") == 0
    finished_clean(r)
    r.close()


def test_a_request_aborted_during_its_async_load_is_released_once(sockets):
    r = replay(sockets, prefix_caching=False, extra={"load_mode": "async"})
    shared = prompt(192, 48)
    r.run([Request("a", shared + prompt(20, 49))])
    b = Request("b", shared + prompt(20, 50))
    r.scheduler.add_request(b)
    r.step()
    assert b.status.name == "WAITING_FOR_REMOTE_KVS"
    r.scheduler.abort("b")
    r.run()
    assert r.scheduler.reports[("finished_sending", "b")] == 0
    finished_clean(r)
    r.close()


def test_cache_salt_lora_and_multimodal_inputs_are_isolated(sockets):
    r = replay(sockets, prefix_caching=False)
    p = prompt(192, 50)
    r.run([Request("a", p + [1], cache_salt="tenant-1")])
    cases = {
        "other-salt": Request("other-salt", p + [2], cache_salt="tenant-2"),
        "no-salt": Request("no-salt", p + [3]),
        "lora": Request("lora", p + [4], cache_salt="tenant-1", lora_request=LoRARequest("adapter-x", 1)),
        "image": Request("image", p + [5], cache_salt="tenant-1",
                         mm_features=[MultiModalFeatureSpec("img-0", PlaceholderRange(10, 20))]),
        "embeds": Request("embeds", p + [6], cache_salt="tenant-1", prompt_embeds=True),
        "same-salt": Request("same-salt", p + [7], cache_salt="tenant-1"),
    }
    for q in cases.values():
        r.run([q])
    hits = {k: r.scheduler.external_hits.get(k, 0) for k in cases}
    assert hits == {"other-salt": 0, "no-salt": 0, "lora": 0, "image": 0, "embeds": 0, "same-salt": 192}
    # A second request with the same image (and adapter-less) shares that image's stored prefix.
    r.run([Request("image-2", p + [8], cache_salt="tenant-1",
                   mm_features=[MultiModalFeatureSpec("img-0", PlaceholderRange(10, 20))])])
    assert r.scheduler.external_hits["image-2"] == 192
    assert r.sched_conn.stats["refused"] == 1
    for k in list(cases) + ["a", "image-2"]:
        assert r.mismatches(k) == 0
    finished_clean(r)
    r.close()


def test_a_cross_layer_cache_is_registered_and_served(sockets):
    r = replay(sockets, prefix_caching=False, cross_layer=True, extra={"cross_layer": True})
    assert r.sched_conn.prefer_cross_layer_blocks
    shared = prompt(128, 60)
    r.run([Request("a", shared + prompt(30, 61))])
    r.run([Request("b", shared + prompt(30, 62))])
    assert r.scheduler.external_hits["b"] == 128
    assert r.mismatches("b") == 0
    finished_clean(r)
    r.close()


def test_pending_lookups_skip_the_request_until_answered(sockets):
    r = replay(sockets, prefix_caching=False, extra={"lookup_wait_us": 0})
    shared = prompt(192, 85)
    r.run([Request("a", shared + prompt(20, 86))])
    pending = []
    orig = r.sched_conn.get_num_new_matched_tokens

    def spy(req, n):
        got = orig(req, n)
        pending.append(got[0] is None)
        return got

    r.sched_conn.get_num_new_matched_tokens = spy
    b = Request("b", shared + prompt(20, 87))
    r.run([b])
    assert pending[-1] is False and r.scheduler.external_hits["b"] == 192
    assert r.mismatches("b") == 0
    finished_clean(r)
    r.close()


def test_aborted_requests_release_their_blocks(sockets):
    r = replay(sockets, prefix_caching=False, token_budget=32)
    a = Request("a", prompt(200, 80), max_tokens=4)
    r.scheduler.add_request(a)
    for _ in range(3):
        r.step()
    r.scheduler.abort("a")
    r.run()
    finished_clean(r)
    r.close()


def test_unknown_and_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="unknown key 'capacity' \\(did you mean 'capacity_bytes'\\?\\)"):
        parse_options({"capacity": 5})
    with pytest.raises(ConfigError, match="'load_mode' is 'later'"):
        parse_options({"load_mode": "later"})
    with pytest.raises(ConfigError, match="'chunk_tokens' is 0"):
        parse_options({"chunk_tokens": 0})
    with pytest.raises(ConfigError, match="engine.geometry is set by the connector"):
        parse_options({"engine": {"geometry": {}}})
    with pytest.raises(ConfigError, match="'cross_layer' is 'yes'"):
        parse_options({"cross_layer": "yes"})
    with pytest.raises(ConfigError, match="engine.chunk_tokens is set by the connector"):
        parse_options({"engine": {"chunk_tokens": 64}})
    cfg = VllmConfig(KVTransferConfig(kv_connector_extra_config={"chunk_tokens": 40}), ModelConfig(), CacheConfig(16))
    with pytest.raises(ConfigError, match="chunk_tokens 40 is not a multiple of vLLM's block size 16"):
        KVortexConnector(cfg, KVConnectorRole.SCHEDULER, KVCacheConfig(8))
    assert parse_options({})["chunk_tokens"] == 256


def test_a_worker_setting_the_engine_rejects_is_an_error_naming_it(sockets):
    with pytest.raises(kvortex.Error, match="disk.dirctory"):
        replay(sockets, extra={"disk": {"dirctory": "/tmp/x"}})


def test_a_lookup_nobody_answers_is_pending_then_a_miss(sockets):
    ktc = KVTransferConfig(kv_connector_extra_config={"chunk_tokens": CHUNK, "socket_dir": sockets,
                                                      "lookup_wait_us": 0, "lookup_timeout_ms": 30})
    conn = KVortexConnector(VllmConfig(ktc, ModelConfig(), CacheConfig(16)), KVConnectorRole.SCHEDULER)
    # A server that accepts the connection and never answers.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(socket_path(sockets, ktc.engine_id, 0, 0, 0))
    silent.listen(1)
    req = Request("q", prompt(100, 90))
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    time.sleep(0.05)
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    assert conn.lookup_timeouts == 1
    silent.close()


def test_no_worker_at_all_is_a_miss_not_a_stall(sockets):
    ktc = KVTransferConfig(kv_connector_extra_config={"chunk_tokens": CHUNK, "socket_dir": sockets})
    conn = KVortexConnector(VllmConfig(ktc, ModelConfig(), CacheConfig(16),
                                       ParallelConfig(tensor_parallel_size=2)), KVConnectorRole.SCHEDULER)
    t0 = time.monotonic()
    assert conn.get_num_new_matched_tokens(Request("q", prompt(100, 91)), 0) == (0, False)
    assert time.monotonic() - t0 < 0.5


WORKER_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    sys.path[:0] = sys.argv[3:]
    from vllm_replay.shapes import *
    from vllm_replay.harness import expected_kv, prefix_hashes
    from kvortex.vllm import KVortexConnector, KVConnectorRole
    ktc = KVTransferConfig(kv_connector_extra_config={"chunk_tokens": 32, "socket_dir": sys.argv[1]}, engine_id=sys.argv[2])
    conn = KVortexConnector(VllmConfig(ktc, ModelConfig(), CacheConfig(16)), KVConnectorRole.WORKER, KVCacheConfig(16))
    kv = [np.zeros((2, 16, 16, 2, 8), dtype=np.uint16) for _ in range(2)]
    conn.register_kv_caches({f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(kv)})
    tokens = np.arange(1, 161, dtype=np.int32)
    conn.engine().store(tokens, conn._layout, list(range(10))).wait()
    print("ready", flush=True)
    sys.stdin.read()
    conn.shutdown()
""")


def test_the_scheduler_reaches_a_worker_in_another_process(sockets):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ktc = KVTransferConfig(kv_connector_extra_config={"chunk_tokens": CHUNK, "socket_dir": sockets})
    paths = [here] + [p for p in sys.path if p]
    child = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, sockets, ktc.engine_id, *paths],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        conn = KVortexConnector(VllmConfig(ktc, ModelConfig(), CacheConfig(16)), KVConnectorRole.SCHEDULER)
        req = Request("x", list(range(1, 161)) + [7, 7, 7])
        got = None
        for _ in range(100):
            got = conn.get_num_new_matched_tokens(req, 0)
            if got[0] is not None:
                break
        assert got == (160, False)
        assert conn.get_num_new_matched_tokens(req, 32) == (128, False)  # beyond vLLM's own 2 blocks
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0
