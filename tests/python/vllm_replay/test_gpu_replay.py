"""The replay over PyTorch CUDA paged caches: the connector's GPU path (device layouts, layer-wise
loads whose events the compute stream waits on, stores after each layer's event)."""

from __future__ import annotations


import pytest

kvortex = pytest.importorskip("kvortex")
torch = pytest.importorskip("torch", reason="the GPU replay needs PyTorch")
if not torch.cuda.is_available() or not kvortex.has_cuda:
    pytest.skip("the GPU replay needs a CUDA device and a CUDA build of kvortex", allow_module_level=True)

from .conftest import prompt  # noqa: E402
from .harness import Replay  # noqa: E402
from .shapes import Request  # noqa: E402


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("cross_layer", [False, True])
def test_gpu_caches_restore_byte_for_byte(sockets, mode, cross_layer):
    r = Replay(socket_dir=sockets, device="cuda:0", layers=4, heads=4, dim=64, num_blocks=128, prefix_caching=False,
               cross_layer=cross_layer, extra={"load_mode": mode, "cross_layer": cross_layer, "capacity_bytes": 1 << 26})
    assert r.workers[0].connector.engine().stack == "gpu"
    shared = prompt(320, 1)
    r.run([Request("a", shared + prompt(40, 2), max_tokens=4)])
    r.run([Request("b", shared + prompt(40, 3), max_tokens=4)])
    torch.cuda.synchronize()
    assert r.scheduler.external_hits["b"] == 320  # ten 32-token chunks of the shared prefix
    assert r.mismatches("a") == 0 and r.mismatches("b") == 0
    r.close()


def test_gpu_two_ranks_and_preemption(sockets):
    r = Replay(socket_dir=sockets, device="cuda:0", tp=2, layers=2, heads=2, dim=64, num_blocks=40, token_budget=64,
               prefix_caching=False, extra={"chunk_tokens": 32, "capacity_bytes": 1 << 26})
    reqs = [Request(f"r{i}", prompt(200, 10 + i), max_tokens=40) for i in range(3)]
    r.run(reqs)
    torch.cuda.synchronize()
    assert any(q.num_preemptions for q in reqs)
    for q in reqs:
        assert r.mismatches(q.request_id) == 0
    r.close()
