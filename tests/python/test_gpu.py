"""The kvortex Python package on the CUDA stack with PyTorch tensors (skipped without a GPU, without
PyTorch, or in a build without CUDA). Every restored byte is compared with the stored one."""

import pytest

import kvortex

torch = pytest.importorskip("torch")
if not kvortex.has_cuda or not torch.cuda.is_available():
    pytest.skip("needs a CUDA build of kvortex, PyTorch with CUDA and a GPU", allow_module_level=True)

LAYERS, HEADS, DIM, BLOCK, CHUNK = 4, 8, 128, 16, 256


def settings(**extra):
    s = {
        "capacity_bytes": "1GiB",
        "chunk_tokens": CHUNK,
        "block_tokens": BLOCK,
        "ns": {"model_id": "py-gpu-test", "dtype": "bfloat16"},
        "geometry": {"num_layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "element_bytes": 2},
    }
    s.update(extra)
    return s


def caches(num_blocks, seed=None, hnd=False):
    g = torch.Generator(device="cuda")
    if seed is not None:
        g.manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        shape = (2, num_blocks, HEADS, BLOCK, DIM) if hnd else (2, num_blocks, BLOCK, HEADS, DIM)
        t = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) if seed is not None else \
            torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
        out.append(t.permute(0, 1, 3, 2, 4) if hnd else t)
    return out


def gathered(cs, table, n):
    idx = torch.as_tensor(table, device="cuda", dtype=torch.long)
    return [c[:, idx].reshape(2, -1, HEADS, DIM)[:, :n] for c in cs]


@pytest.mark.parametrize("hnd", [False, True])
def test_round_trip_through_device_tensors_with_a_stream(hnd):
    with kvortex.Engine(settings(), stack="gpu") as e:
        prompt = torch.randint(0, 128000, (4 * CHUNK,), dtype=torch.int32)
        nb = 96
        src = caches(nb, seed=1, hnd=hnd)
        table = torch.randperm(nb)[: len(prompt) // BLOCK].to(torch.int32)
        layout = kvortex.flash_attn_layout(src)
        assert layout.on_device and layout.kind == ("flash_attn_hnd" if hnd else "flash_attn_nhd")
        torch.cuda.synchronize()
        assert e.store(prompt.numpy(), layout, table.numpy()).wait() == len(prompt)
        dst = caches(nb, hnd=hnd)
        table2 = torch.randperm(nb)[: len(prompt) // BLOCK].to(torch.int32)
        stream = torch.cuda.Stream()
        ticket = e.retrieve(prompt.numpy(), kvortex.flash_attn_layout(dst), table2.numpy(), stream=stream.cuda_stream)
        assert ticket.wait() == len(prompt)
        stream.synchronize()
        for a, b in zip(gathered(dst, table2.numpy(), len(prompt)), gathered(src, table.numpy(), len(prompt))):
            assert torch.equal(a, b)


def test_layer_by_layer_retrieve_into_device_tensors():
    with kvortex.Engine(settings(), stack="gpu") as e:
        prompt = torch.randint(0, 128000, (2 * CHUNK,), dtype=torch.int32).numpy()
        src = caches(64, seed=2)
        torch.cuda.synchronize()
        e.store(prompt, kvortex.flash_attn_layout(src)).wait()
        dst = caches(64)
        op = e.begin_retrieve(prompt, kvortex.flash_attn_layout(dst))
        stream = torch.cuda.current_stream()
        for layer in range(LAYERS):
            op.submit_layer(layer, stream=stream.cuda_stream)
        assert op.finish().wait() == len(prompt)
        torch.cuda.synchronize()
        for a, b in zip(dst, src):
            assert torch.equal(a[:, : len(prompt) // BLOCK], b[:, : len(prompt) // BLOCK])


def test_host_stack_refuses_device_tensors():
    with kvortex.Engine(settings()) as e:
        with pytest.raises(kvortex.Error) as err:
            e.store(list(range(CHUNK)), kvortex.flash_attn_layout(caches(16, seed=3)))
        assert err.value.code == "unsupported"
