"""kvortex.integrations.transformers on a real transformers Llama model on the GPU (random bf16
weights, nothing downloaded): the prefix KV saved after a prefill and restored into a DynamicCache
gives first-token logits bitwise equal to running the tail on the original prefill's cache.
Skipped without PyTorch with CUDA, transformers, a GPU or a CUDA build of kvortex."""

import pytest

import kvortex

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not kvortex.has_cuda or not torch.cuda.is_available():
    pytest.skip("needs a CUDA build of kvortex, PyTorch with CUDA and a GPU", allow_module_level=True)

from kvortex.integrations.transformers import PrefixStore, engine_settings  # noqa: E402


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


def test_engine_geometry_must_match_the_model(model):
    cfg = model.config
    settings = engine_settings(cfg, capacity_bytes="64MiB", chunk_tokens=64)
    settings["geometry"]["kv_heads"] = 4
    with kvortex.Engine(settings, stack="gpu") as engine:
        with pytest.raises(ValueError, match="KV heads"):
            PrefixStore(engine, cfg)
