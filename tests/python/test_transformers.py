"""kvortex.integrations.transformers on a real transformers Llama model on the GPU (random bf16
weights, nothing downloaded): the prefix KV saved after a prefill and restored into a DynamicCache
gives first-token logits bitwise equal to running the tail on the original prefill's cache; under
continuous batching (generate_batch), prefixes restored into a fresh PagedAttentionCache give the
same tokens and log-probabilities as transformers' own GPU prefix cache holding them.
Skipped without PyTorch with CUDA, transformers, a GPU or a CUDA build of kvortex."""

import pytest

import kvortex

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not kvortex.has_cuda or not torch.cuda.is_available():
    pytest.skip("needs a CUDA build of kvortex, PyTorch with CUDA and a GPU", allow_module_level=True)

from kvortex.integrations.transformers import PagedCacheStore, PrefixStore, engine_settings  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                                   intermediate_size=1024, vocab_size=1000, max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


@torch.no_grad()
def test_restored_prefix_gives_the_same_first_token_logits(model):
    cfg = model.config
    with kvortex.Engine(engine_settings(cfg, capacity_bytes="512MiB", chunk_tokens=64), stack="gpu") as engine:
        store = PrefixStore(engine, cfg)
        prompt = torch.randint(0, cfg.vocab_size, (1, 300), device="cuda")
        prefix = 256
        out = model(prompt[:, :prefix], use_cache=True)
        assert store.save(prompt[0, :prefix], out.past_key_values) == prefix
        # Reference: the tail on the original prefill's cache.
        ref = model(prompt[:, prefix:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1].float()

        assert store.lookup(prompt[0]) == prefix
        cache, hit = store.restore(prompt[0])
        assert hit == prefix and cache.get_seq_length() == prefix
        got = model(prompt[:, hit:], past_key_values=cache, use_cache=True).logits[:, -1].float()
        assert torch.equal(got, ref), f"max |dlogit| {float((got - ref).abs().max())}"

        # A prompt of exactly the stored prefix leaves its last chunk to the model.
        assert store.lookup(prompt[0, :prefix]) == prefix - 64
        # Another prompt: a miss.
        other = torch.randint(0, cfg.vocab_size, (300,), device="cuda")
        assert store.restore(other) == (None, 0)
        stats = engine.stats()
        assert stats["stored_chunks"] == prefix // 64


@torch.no_grad()
def test_layer_by_layer_save_during_the_prefill(model):
    cfg = model.config
    with kvortex.Engine(engine_settings(cfg, capacity_bytes="512MiB", chunk_tokens=64), stack="gpu") as engine:
        store = PrefixStore(engine, cfg)
        prompt = torch.randint(0, cfg.vocab_size, (1, 300), device="cuda")
        prefix = 256
        saving = store.saving_cache(prompt[0, :prefix + 10])  # whole chunks only: 256 of the 266 tokens
        out = model(prompt[:, :prefix + 10], past_key_values=saving, use_cache=True)
        assert out.past_key_values is saving
        assert store.flush() == prefix
        assert engine.stats()["stored_chunks"] == prefix // 64
        # The stored KV is the prefill's, byte for byte.
        cache, hit = store.restore(prompt[0])
        assert hit == prefix
        for a, b in zip(cache.layers, saving.layers):
            assert torch.equal(a.keys, b.keys[..., :prefix, :]) and torch.equal(a.values, b.values[..., :prefix, :])
        # Decode steps after the prefill store nothing more.
        model(prompt[:, prefix + 10:prefix + 11], past_key_values=saving, use_cache=True)
        assert store.flush() == 0 and engine.stats()["stored_chunks"] == prefix // 64


def test_engine_geometry_must_match_the_model(model):
    cfg = model.config
    settings = engine_settings(cfg, capacity_bytes="64MiB", chunk_tokens=64)
    settings["geometry"]["kv_heads"] = 4
    with kvortex.Engine(settings, stack="gpu") as engine:
        with pytest.raises(ValueError, match="KV heads"):
            PrefixStore(engine, cfg)


def _cb(**kw):
    # Sizes given, not inferred from each call's workload: a persistent manager keeps the first call's.
    settings = dict(block_size=32, num_blocks=256, max_batch_tokens=1024, max_requests_per_batch=16,
                    use_cuda_graph=False, use_async_batching=False, return_logprobs=True)
    settings.update(kw)
    return transformers.ContinuousBatchingConfig(**settings)


def _gen():
    return transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1)


def _prompts(cfg, shared, tail, n, seed):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, cfg.vocab_size, (shared,), generator=g).tolist()
    return [prefix + torch.randint(0, cfg.vocab_size, (tail,), generator=g).tolist() for _ in range(n + 1)]


def _results(out, n):
    assert len(out) == n
    for r in out.values():
        assert r.error is None, r.error
    return [(list(r.generated_tokens), list(r.logprobs)) for r in out.values()]


@torch.no_grad()
def test_continuous_batching_restores_prefixes_into_a_fresh_paged_cache(model):
    cfg = model.config
    warm, *prompts = _prompts(cfg, 256, 40, 5, 1)

    # Reference: transformers' GPU prefix cache, warmed by one request sharing the prefix.
    model.generate_batch([warm], generation_config=_gen(), continuous_batching_config=_cb(), persistent_manager=True)
    ref = _results(model.generate_batch(prompts, generation_config=_gen(), continuous_batching_config=_cb(),
                                        persistent_manager=True), len(prompts))
    model.destroy_cached_continuous_batching_manager()

    with kvortex.Engine(engine_settings(cfg, capacity_bytes="256MiB", chunk_tokens=64), stack="gpu") as engine:
        store = PagedCacheStore(engine, cfg)
        with store.installed():
            model.generate_batch([warm], generation_config=_gen(), continuous_batching_config=_cb())
            store.flush()
            first = store.stats()
            assert first["disabled"] == "" and first["restored_tokens"] == 0
            # The warm request's whole chunks: 296 prompt + 6 generated tokens complete 9 blocks of 32, 4 chunks of 64.
            assert first["stored_tokens"] == 256 and engine.stats()["stored_chunks"] == 4
            # A fresh manager, so a cold GPU cache: the prefix comes from KVortex.
            got = _results(model.generate_batch(prompts, generation_config=_gen(), continuous_batching_config=_cb()),
                           len(prompts))
        st = store.stats()
        # The first request restores the prefix; the others then share its blocks on the GPU.
        assert st["restored_requests"] == 1 and st["restored_tokens"] == 256
        assert st["short_restores"] == 0 and st["store_errors"] == 0
        assert got == ref

        # Another tenant's salt sees none of it: it computes the prefix and stores it under its own keys.
        chunks = engine.stats()["stored_chunks"]
        other = PagedCacheStore(engine, cfg, salt=b"tenant-b")
        with other.installed():
            _results(model.generate_batch(prompts, generation_config=_gen(), continuous_batching_config=_cb()),
                     len(prompts))
        other.flush()
        assert other.stats()["lookups"] >= 1 and other.stats()["restored_tokens"] == 0
        assert engine.stats()["stored_chunks"] >= chunks + 4


@torch.no_grad()
def test_continuous_batching_stores_the_prompt_of_a_one_token_generation(model):
    cfg = model.config
    prompts = _prompts(cfg, 128, 8, 1, 5)  # 136 tokens: the finishing forward computes 4 blocks of 32
    one = transformers.GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=-1)
    with kvortex.Engine(engine_settings(cfg, capacity_bytes="64MiB", chunk_tokens=64), stack="gpu") as engine:
        store = PagedCacheStore(engine, cfg, store_generated=False)
        with store.installed():
            with pytest.raises(RuntimeError, match="another PagedCacheStore"):
                with PagedCacheStore(engine, cfg).installed():
                    pass
            _results(model.generate_batch(prompts[:1], generation_config=one, continuous_batching_config=_cb()), 1)
            st = store.stats()
            assert st["stored_tokens"] == 128 and engine.stats()["stored_chunks"] == 2
            out = _results(model.generate_batch(prompts[1:], generation_config=one, continuous_batching_config=_cb()), 1)
        assert store.stats()["restored_tokens"] == 128 and len(out[0][0]) == 1


@torch.no_grad()
def test_continuous_batching_without_prefix_sharing_leaves_the_cache_alone(model):
    cfg = model.config
    prompts = _prompts(cfg, 128, 20, 2, 3)
    with kvortex.Engine(engine_settings(cfg, capacity_bytes="64MiB", chunk_tokens=64), stack="gpu") as engine:
        store = PagedCacheStore(engine, cfg)
        with store.installed():
            out = _results(model.generate_batch(prompts, generation_config=_gen(),
                                                continuous_batching_config=_cb(allow_block_sharing=False)), len(prompts))
        assert all(len(t) == 6 for t, _ in out)
        st = store.stats()
        assert "does not share prefixes" in st["disabled"]
        assert st["lookups"] == 0 and st["stored_tokens"] == 0 and engine.stats()["stored_chunks"] == 0

    settings = engine_settings(cfg, capacity_bytes="64MiB", chunk_tokens=64)
    settings["geometry"]["head_dim"] = 32
    with kvortex.Engine(settings, stack="gpu") as engine:
        with pytest.raises(ValueError, match="head"):
            PagedCacheStore(engine, cfg)
