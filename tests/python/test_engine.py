"""The kvortex Python package on the host stack, with NumPy arrays as the inference engine's KV cache.

Every restored byte is compared with the bytes that were stored. Run from a build with
-DKVORTEX_BUILD_PYTHON=ON: `ctest -L python`, or PYTHONPATH=<build>/python python3 -m pytest tests/python.
"""

import asyncio
import threading

import numpy as np
import pytest

import kvortex

LAYERS, HEADS, DIM, BLOCK, CHUNK = 2, 2, 8, 16, 32


def settings(capacity_chunks=64, **extra):
    token_bytes = LAYERS * 2 * HEADS * DIM * 2
    s = {
        "capacity_bytes": capacity_chunks * CHUNK * token_bytes,
        "chunk_tokens": CHUNK,
        "block_tokens": BLOCK,
        "transfer_threads": 1,
        "ns": {"model_id": "py-test", "dtype": "float16"},
        "geometry": {"num_layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "element_bytes": 2},
    }
    s.update(extra)
    return s


def paged_cache(num_blocks, seed=None):
    """vLLM's FlashAttention layout: per layer [2, num_blocks, BLOCK, HEADS, DIM] float16."""
    rng = np.random.default_rng(seed)
    caches = []
    for _ in range(LAYERS):
        c = np.zeros((2, num_blocks, BLOCK, HEADS, DIM), dtype=np.float16)
        if seed is not None:
            c[...] = rng.standard_normal(c.shape).astype(np.float16)
        caches.append(c)
    return caches


def tokens(n, seed):
    return np.random.default_rng(seed).integers(0, 128000, size=n, dtype=np.int32)


def gather(caches, table, n):
    """The first n tokens' KV through a block table: [layer, plane, token, head, dim]."""
    out = np.empty((LAYERS, 2, n, HEADS, DIM), dtype=np.float16)
    for t in range(n):
        b, s = table[t // BLOCK], t % BLOCK
        for layer in range(LAYERS):
            out[layer, :, t] = caches[layer][:, b, s]
    return out


def test_store_lookup_retrieve_round_trip_with_random_block_tables():
    with kvortex.Engine(settings()) as e:
        prompt = tokens(8 * CHUNK, 1)
        src = paged_cache(40, seed=1)
        t_src = np.random.default_rng(2).permutation(40)[: len(prompt) // BLOCK].astype(np.int32)
        assert e.store(prompt, kvortex.flash_attn_layout(src), t_src).wait() == len(prompt)
        assert e.lookup(prompt) == len(prompt)
        assert e.lookup(list(prompt[: 3 * CHUNK + 5])) == 3 * CHUNK  # a list of ints works too
        dst = paged_cache(40)
        t_dst = np.random.default_rng(3).permutation(40)[: len(prompt) // BLOCK].astype(np.int32)
        assert e.retrieve(prompt, kvortex.flash_attn_layout(dst), t_dst).wait() == len(prompt)
        assert np.array_equal(gather(dst, t_dst, len(prompt)), gather(src, t_src, len(prompt)))
        s = e.stats()
        assert s["stored_chunks"] == 8 and s["retrieved_chunks"] == 8
        assert s["tiers"] == []


def test_hnd_caches_and_int64_tokens():
    with kvortex.Engine(settings()) as e:
        prompt = tokens(4 * CHUNK, 4).astype(np.int64)
        # HND storage: [2, blocks, heads, block, dim], passed as the [2, blocks, block, heads, dim] view.
        phys = [np.random.default_rng(5 + i).standard_normal((2, 8, HEADS, BLOCK, DIM)).astype(np.float16) for i in range(LAYERS)]
        views = [p.transpose(0, 1, 3, 2, 4) for p in phys]
        layout = kvortex.flash_attn_layout(views)
        assert layout.kind == "flash_attn_hnd"
        assert e.store(prompt, layout).wait() == len(prompt)
        out = [np.zeros_like(p) for p in phys]
        assert e.retrieve(prompt, kvortex.flash_attn_layout([o.transpose(0, 1, 3, 2, 4) for o in out])).wait() == len(prompt)
        for a, b in zip(out, phys):
            assert np.array_equal(a, b)


def test_layer_by_layer_store_and_retrieve():
    with kvortex.Engine(settings()) as e:
        prompt = tokens(3 * CHUNK, 6)
        src = paged_cache(8, seed=7)
        op = e.begin_store(prompt, kvortex.flash_attn_layout(src))
        assert op.tokens == len(prompt)
        for layer in reversed(range(LAYERS)):
            op.submit_layer(layer)
        assert op.finish().wait() == len(prompt)
        dst = paged_cache(8)
        op = e.begin_retrieve(prompt, kvortex.flash_attn_layout(dst))
        assert op.tokens == len(prompt)
        op.submit_all()
        assert op.finish().wait() == len(prompt)
        table = np.arange(8, dtype=np.int32)
        assert np.array_equal(gather(dst, table, len(prompt)), gather(src, table, len(prompt)))
        # A layer submitted twice is an error naming it.
        op = e.begin_retrieve(prompt, kvortex.flash_attn_layout(dst))
        op.submit_layer(0)
        with pytest.raises(kvortex.Error) as err:
            op.submit_layer(0)
        assert err.value.code == "invalid_argument" and "layer 0" in err.value.message


def test_key_api_round_trip():
    with kvortex.Engine(settings()) as e:
        keys = e.chunk_keys(tokens(2 * CHUNK, 8))
        assert len(keys) == 2 and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
        blocks = [np.random.default_rng(i).integers(0, 255, 4096, dtype=np.uint8) for i in range(2)]
        assert e.save_blocks(keys, [b.ctypes.data for b in blocks], [b.nbytes for b in blocks]) == 2
        assert e.check_blocks(keys + [bytes(32)]) == [True, True, False]
        out = [np.zeros(4096, dtype=np.uint8) for _ in range(2)]
        e.load_blocks(keys, [o.ctypes.data for o in out], [o.nbytes for o in out])
        assert all(np.array_equal(a, b) for a, b in zip(out, blocks))
        with pytest.raises(kvortex.Error) as err:
            e.load_blocks([bytes(32)], [out[0].ctypes.data], [4096])
        assert err.value.code == "not_found"
        with pytest.raises(ValueError, match="32 bytes"):
            e.check_blocks([b"short"])


def test_bad_settings_and_bad_tensors_raise_errors_that_name_them():
    with pytest.raises(kvortex.Error) as err:
        kvortex.Engine(settings(capacity_byte=1))
    assert err.value.code == "invalid_config" and "capacity_byte" in err.value.message
    with pytest.raises(kvortex.Error) as err:
        kvortex.Engine({**settings(), "geometry": {"num_layers": 0, "kv_heads": 2, "head_dim": 8}})
    assert err.value.code == "invalid_config" and "num_layers" in err.value.message
    with pytest.raises(kvortex.Error) as err:
        kvortex.Engine(settings(), stack="tpu")
    assert err.value.code == "unsupported"

    caches = paged_cache(8)
    caches[1] = np.zeros((2, 8, BLOCK, HEADS, DIM + 1), dtype=np.float16)
    with pytest.raises(ValueError, match=r"kv_caches\[1\]: dimension 4 \(head_dim\) is 9, expected 8"):
        kvortex.flash_attn_layout(caches)
    with pytest.raises(ValueError, match=r"kv_caches\[0\]: expected 5 dimensions"):
        kvortex.flash_attn_layout([np.zeros((8, BLOCK, HEADS, DIM), dtype=np.float16)] * LAYERS)
    strided = [np.zeros((2, 8, BLOCK, HEADS, 2 * DIM), dtype=np.float16)[..., :DIM] for _ in range(LAYERS)]
    with pytest.raises(ValueError, match=r"kv_caches\[0\]: dimension 0 \(kv\) has a stride of 8192 bytes, expected 4096"):
        kvortex.flash_attn_layout(strided)
    with pytest.raises(TypeError, match="not a tensor"):
        kvortex.flash_attn_layout([object()])

    with kvortex.Engine(settings()) as e:
        wrong = [np.zeros((2, 8, BLOCK, HEADS, DIM), dtype=np.float32) for _ in range(LAYERS)]
        with pytest.raises(kvortex.Error) as err:
            e.store(tokens(CHUNK, 9), kvortex.flash_attn_layout(wrong))
        assert err.value.code == "size_mismatch"
        with pytest.raises(kvortex.Error) as err:
            e.lookup([])
        assert err.value.code == "invalid_argument"
        dup = np.zeros(CHUNK // BLOCK, dtype=np.int32)  # the same block twice
        with pytest.raises(kvortex.Error) as err:
            e.retrieve(tokens(CHUNK, 10), kvortex.flash_attn_layout(paged_cache(8)), dup)
        assert err.value.code == "invalid_argument"
        with pytest.raises(ValueError):
            e.lookup(np.zeros((2, 2), dtype=np.int32))


def test_split_k_and_v_tensors_per_layer():
    with kvortex.Engine(settings()) as e:
        slots = 8 * BLOCK
        # Every K and V its own allocation, as transformers' PagedAttentionCache makes them.
        rng = np.random.default_rng(20)
        keys = [rng.standard_normal((slots, HEADS, DIM)).astype(np.float16) for _ in range(LAYERS)]
        values = [rng.standard_normal((slots, HEADS, DIM)).astype(np.float16) for _ in range(LAYERS)]
        layout = kvortex.split_kv_layout(keys, values, block_tokens=BLOCK)
        assert layout.kind == "split_kv"
        prompt = tokens(4 * CHUNK, 11)
        table = np.random.default_rng(12).permutation(8)[: len(prompt) // BLOCK].astype(np.int32)
        assert e.store(prompt, layout, table).wait() == len(prompt)
        # Retrieved into tensors allocated in the other order, values before keys.
        out_v = [np.zeros_like(v) for v in values]
        out_k = [np.zeros_like(k) for k in keys]
        out_layout = kvortex.split_kv_layout(out_k, out_v, block_tokens=BLOCK)
        assert e.retrieve(prompt, out_layout, table).wait() == len(prompt)
        used = np.concatenate([np.arange(b * BLOCK, (b + 1) * BLOCK) for b in table])
        unused = np.setdiff1d(np.arange(slots), used)
        for k, v, ok, ov in zip(keys, values, out_k, out_v):
            assert np.array_equal(ok[used], k[used]) and np.array_equal(ov[used], v[used])
            assert not ok[unused].any() and not ov[unused].any()
        with pytest.raises(ValueError, match=r"values\[1\]: shape"):
            kvortex.split_kv_layout(keys, [values[0], values[1][: slots - BLOCK]], block_tokens=BLOCK)
        # One buffer holding V of layer 1 half-way into K of layer 1: a store may read it, a retrieve may not write it.
        both = np.zeros((slots + slots // 2, HEADS, DIM), dtype=np.float16)
        overlapping = kvortex.split_kv_layout([out_k[0], both[:slots]], [out_v[0], both[slots // 2:]], block_tokens=BLOCK)
        with pytest.raises(kvortex.Error, match=r"keys\[1\] and values\[1\] overlap") as err:
            e.retrieve(prompt, overlapping, table).wait()
        assert err.value.code == "invalid_layout"


def test_tickets_are_awaitable_and_calls_run_from_threads():
    with kvortex.Engine(settings(capacity_chunks=256)) as e:
        async def main():
            prompt = tokens(2 * CHUNK, 13)
            return await e.store(prompt, kvortex.flash_attn_layout(paged_cache(8, seed=14)))

        assert asyncio.run(main()) == 2 * CHUNK
        errors = []

        def worker(i):
            try:
                prompt = tokens(4 * CHUNK, 100 + i)
                src = paged_cache(16, seed=200 + i)
                for _ in range(5):
                    e.store(prompt, kvortex.flash_attn_layout(src)).wait()
                    dst = paged_cache(16)
                    assert e.retrieve(prompt, kvortex.flash_attn_layout(dst)).wait() == len(prompt)
                    table = np.arange(16, dtype=np.int32)
                    assert np.array_equal(gather(dst, table, len(prompt)), gather(src, table, len(prompt)))
            except Exception as ex:  # pragma: no cover - reported below
                errors.append(ex)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_stats_and_prometheus_text():
    with kvortex.Engine(settings()) as e:
        prompt = tokens(2 * CHUNK, 15)
        e.store(prompt, kvortex.flash_attn_layout(paged_cache(8, seed=16))).wait()
        e.lookup(prompt)
        text = e.prometheus()
        assert "kvortex_stored_chunks_total 2\n" in text
        assert "kvortex_lookups_total 1\n" in text
        assert "llm_kv_stored_chunks_total 2\n" in e.prometheus("llm_kv")
        with pytest.raises(kvortex.Error) as err:
            e.prometheus("bad prefix")
        assert err.value.code == "invalid_argument"


def test_shutdown_makes_later_calls_fail():
    e = kvortex.Engine(settings())
    e.shutdown()
    with pytest.raises(kvortex.Error) as err:
        e.lookup(tokens(CHUNK, 17))
    assert err.value.code == "shut_down"


@pytest.mark.skipif(not kvortex.has_disk_tier, reason="built without xxHash: no disk tier")
def test_disk_tier_from_settings_serves_a_restarted_engine(tmp_path):
    disk = {"directory": str(tmp_path / "kv"), "capacity_bytes": "64MiB"}
    prompt = tokens(6 * CHUNK, 18)
    src = paged_cache(16, seed=19)
    with kvortex.Engine(settings(disk=disk)) as e:
        assert "disk" in e.stack
        assert e.store(prompt, kvortex.flash_attn_layout(src)).wait() == len(prompt)
        e.flush()
        assert e.stats()["tiers"][0]["demoted_chunks"] == 6
    with kvortex.Engine(settings(disk=disk)) as e:
        where = e.lookup_tiers(prompt)
        assert where == {"tokens": len(prompt), "memory": 0, "disk": len(prompt)}
        dst = paged_cache(16)
        assert e.retrieve(prompt, kvortex.flash_attn_layout(dst)).wait() == len(prompt)
        table = np.arange(16, dtype=np.int32)
        assert np.array_equal(gather(dst, table, len(prompt)), gather(src, table, len(prompt)))
        assert e.prefetch(prompt).wait() == len(prompt)
    with pytest.raises(kvortex.Error) as err:
        kvortex.Engine(settings(disk={**disk, "fsync": "sometimes"}))
    assert err.value.code == "invalid_config" and "fsync" in err.value.message


def test_salts_scope_keys_and_skip_entries_leave_blocks_untouched():
    with kvortex.Engine(settings()) as e:
        prompt = tokens(4 * CHUNK, 11)
        src = paged_cache(16, seed=5)
        table = np.arange(8, dtype=np.int32)
        assert e.store(prompt, kvortex.flash_attn_layout(src), table, salt=b"tenant-a").wait() == 4 * CHUNK
        assert e.lookup(prompt) == 0
        assert e.lookup(prompt, salt="tenant-a") == 4 * CHUNK  # str is its UTF-8 bytes
        assert e.lookup(prompt, salt=b"tenant-b") == 0
        assert e.chunk_keys(prompt, salt=b"tenant-a") != e.chunk_keys(prompt)
        with pytest.raises(TypeError):
            e.lookup(prompt, salt=5)
        # -1 entries: blocks the destination already holds are not written.
        dst = paged_cache(16)
        for c in dst:
            c[...] = 7.0
        dst_table = np.array([-1, -1, -1, 3, 4, 5, 6, 7], dtype=np.int32)
        assert e.retrieve(prompt, kvortex.flash_attn_layout(dst), dst_table, salt=b"tenant-a").wait() == 4 * CHUNK
        for layer in range(LAYERS):
            assert np.all(dst[layer][:, 0:3] == 7.0)
            np.testing.assert_array_equal(dst[layer][:, 3:8], src[layer][:, 3:8])
        with pytest.raises(kvortex.Error) as err:
            e.retrieve(prompt, kvortex.flash_attn_layout(dst), np.array([-2, 1, 2, 3, 4, 5, 6, 7], dtype=np.int32))
        assert err.value.code == "invalid_argument"


def test_lookups_served_over_a_socket_reach_the_minimum_over_engines(tmp_path):
    prompt = tokens(4 * CHUNK, 12)
    src = paged_cache(16, seed=6)
    with kvortex.Engine(settings()) as e0, kvortex.Engine(settings()) as e1:
        lay = kvortex.flash_attn_layout(src)
        assert e0.store(prompt, lay, np.arange(8, dtype=np.int32)).wait() == 4 * CHUNK
        assert e1.store(prompt[: 2 * CHUNK], lay, np.arange(4, dtype=np.int32)).wait() == 2 * CHUNK
        p0, p1 = str(tmp_path / "r0.sock"), str(tmp_path / "r1.sock")
        e0.serve_lookups(p0)
        e1.serve_lookups(p1)
        with pytest.raises(kvortex.Error, match="in use"):
            e1.serve_lookups(p0)
        client = kvortex.LookupClient([p0, p1])
        q = client.send(prompt)
        got = None
        for _ in range(200):
            got = client.poll(q, 10000)
            if got is not None:
                break
        assert got == 2 * CHUNK
        assert client.stats()["answers"] == 2
        assert e0.lookup_server_stats()[0]["queries"] == 1
        with pytest.raises(kvortex.Error) as err:
            client.poll(q)
        assert err.value.code == "not_found"
    # Engines shut down: their sockets are gone, and a query counts them as 0 at once.
    assert not (tmp_path / "r0.sock").exists()
    q = client.send(prompt)
    assert client.poll(q, 100000) == 0
