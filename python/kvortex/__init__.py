"""KVortex: KV-cache offloading for LLM inference, from Python.

The engine is the C++ library (``kvortex._kvortex``); this package adds what Python callers need
around it: settings from nested dicts, KV cache layouts derived from tensors (PyTorch, CuPy, NumPy
or anything with ``__cuda_array_interface__`` / ``__array_interface__`` / ``__dlpack__``), and
awaitable tickets. It does not import PyTorch.

    import kvortex
    engine = kvortex.Engine({
        "capacity_bytes": "8GiB",
        "chunk_tokens": 256, "block_tokens": 16,
        "ns": {"model_id": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16"},
        "geometry": {"num_layers": 32, "kv_heads": 8, "head_dim": 128, "element_bytes": 2},
        "disk": {"directory": "/var/cache/kvortex", "capacity_bytes": "64GiB"},   # optional
    })
    layout = kvortex.flash_attn_layout(kv_caches)      # one [2, blocks, 16, heads, dim] tensor per layer
    hit = engine.lookup(prompt_ids)                    # leading tokens stored
    engine.retrieve(prompt_ids[:hit], layout, block_table).wait()
    engine.store(prompt_ids, layout, block_table).wait()

Every setting key is the C++ ``deployment_config`` key (``kvortex/deployment_config.hpp`` lists
them); an unknown key raises ``kvortex.Error`` (code ``invalid_config``) naming it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable, Mapping, Sequence

from . import _kvortex
from ._kvortex import Layout, LayeredTransfer, LookupClient, Ticket, has_cuda, has_disk_tier, has_redis_tier, log_to_stderr

__version__ = _kvortex.__version__

__all__ = [
    "Engine",
    "Error",
    "Layout",
    "LayeredTransfer",
    "LookupClient",
    "Ticket",
    "contiguous_layout",
    "cross_layer_layout",
    "flash_attn_layout",
    "flashinfer_layout",
    "has_cuda",
    "has_disk_tier",
    "has_redis_tier",
    "log_to_stderr",
    "mla_layout",
    "split_kv_layout",
]


class Error(RuntimeError):
    """A KVortex call failed. ``code`` is the C++ ``kvortex::errc`` name (``invalid_argument``,
    ``invalid_config``, ``size_mismatch``, ``invalid_layout``, ``capacity_exhausted``,
    ``not_found``, ``shut_down``, ``unsupported``, ``backend_failure``, ...); ``message`` says
    what and which value."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_kvortex._set_error_type(Error)


def _ticket_await(self: Ticket):
    # Waits on a worker thread, so the event loop keeps running.
    return asyncio.get_running_loop().run_in_executor(None, self.wait).__await__()


Ticket.__await__ = _ticket_await  # type: ignore[attr-defined]


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict:
    out: dict = {}
    for key, value in settings.items():
        if not isinstance(key, str):
            raise TypeError(f"setting keys are strings, got {key!r}")
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


class Engine(_kvortex.Engine):
    """The KV chunk store. ``settings``: the deployment's keys, nested (``{"geometry": {...}}``)
    or dotted (``{"geometry.num_layers": 32}``); ``disk`` / ``redis`` sections add those tiers
    below host memory (their namespace digest defaults to the engine's). ``stack``: ``"host"``
    (copies by the CPU, host tensors) or ``"gpu"`` (CUDA builds: pinned host pool, copies to and
    from device tensors).

    Methods take token ids as a 1-D int32/int64 array or a sequence of ints, block tables likewise
    (``None``: identity; in a retrieve's table, ``-1`` marks a block the cache already holds: it
    is not written). Every token method takes ``salt=`` (bytes or str): a prompt stored under a
    salt is found only under the same salt (tenants' cache salts, LoRA adapters, multimodal
    inputs). ``serve_lookups(path)`` answers ``lookup`` for other processes over a Unix socket
    (``LookupClient``), on a thread that never takes the GIL. ``store``/``retrieve`` return a ``Ticket`` (``wait()``, ``ready()``,
    awaitable); ``begin_store``/``begin_retrieve`` a ``LayeredTransfer`` (``submit_layer(i,
    stream=0, event=0)``, ``submit_all``, ``finish``). ``stream``/``event`` are CUDA handles as
    ints (``torch.cuda.current_stream().cuda_stream``, ``event.cuda_event``): a retrieve makes the
    stream wait for its copies; a store waits for the event before copying. The GIL is released
    while copies are submitted and waited for."""

    def __init__(self, settings: Mapping[str, Any], stack: str = "host"):
        super().__init__(_flatten(settings), stack)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


# ---- tensors ------------------------------------------------------------------------------------


class _ArrayInfo:
    __slots__ = ("ptr", "shape", "strides", "itemsize", "device", "owner")

    def __init__(self, ptr, shape, strides, itemsize, device, owner):
        self.ptr, self.shape, self.strides = int(ptr), tuple(int(s) for s in shape), tuple(int(s) for s in strides)
        self.itemsize, self.device, self.owner = int(itemsize), bool(device), owner

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for s in self.shape:
            n *= s
        return n


def _contiguous_strides(shape: Sequence[int], itemsize: int) -> tuple:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _interface_info(ai: Mapping[str, Any], device: bool, owner: Any) -> _ArrayInfo:
    typestr = ai["typestr"]
    itemsize = int(typestr[2:])
    shape = tuple(ai["shape"])
    strides = ai.get("strides") or _contiguous_strides(shape, itemsize)
    return _ArrayInfo(ai["data"][0], shape, strides, itemsize, device, owner)


def _array_info(t: Any, what: str) -> _ArrayInfo:
    """Pointer, shape, byte strides, element size and device of a tensor, through whichever
    protocol it speaks (PyTorch's own accessors first: they cover bfloat16 on the CPU)."""
    if hasattr(t, "data_ptr") and hasattr(t, "element_size") and hasattr(t, "stride"):  # torch.Tensor
        es = int(t.element_size())
        return _ArrayInfo(t.data_ptr(), tuple(t.shape), tuple(int(s) * es for s in t.stride()), es,
                          bool(getattr(t, "is_cuda", False)), t)
    if hasattr(t, "__cuda_array_interface__"):
        return _interface_info(t.__cuda_array_interface__, True, t)
    if hasattr(t, "__array_interface__"):
        return _interface_info(t.__array_interface__, False, t)
    if hasattr(t, "__dlpack__"):
        import numpy  # host tensors only: a device DLPack tensor also has __cuda_array_interface__ or torch's accessors

        a = numpy.from_dlpack(t)
        return _interface_info(a.__array_interface__, False, (t, a))
    raise TypeError(f"{what}: not a tensor (no __cuda_array_interface__, __array_interface__ or __dlpack__): {type(t).__name__}")


def _one_device(infos: Sequence[_ArrayInfo], what: str) -> bool:
    devices = {i.device for i in infos}
    if len(devices) != 1:
        raise ValueError(f"{what}: some tensors are on the GPU and some are not")
    return devices.pop()


def _check_dims(info: _ArrayInfo, name: str, expected: Sequence[int], labels: Sequence[str]) -> None:
    if len(info.shape) != len(expected):
        raise ValueError(f"{name}: expected {len(expected)} dimensions {list(labels)}, got shape {list(info.shape)}")
    for d, (got, want, label) in enumerate(zip(info.shape, expected, labels)):
        if want is not None and got != want:
            raise ValueError(f"{name}: dimension {d} ({label}) is {got}, expected {want}")


def _check_strides(info: _ArrayInfo, name: str, expected: Sequence[int], labels: Sequence[str]) -> None:
    for d, (got, want, label) in enumerate(zip(info.strides, expected, labels)):
        if info.shape[d] > 1 and got != want:
            raise ValueError(f"{name}: dimension {d} ({label}) has a stride of {got} bytes, expected {want} "
                             f"(the layout needs this dimension dense)")


def _paged_layers(kv_caches: Sequence[Any], what: str):
    if isinstance(kv_caches, Mapping):
        kv_caches = list(kv_caches.values())
    tensors = list(kv_caches)
    if not tensors:
        raise ValueError(f"{what}: no layer tensors")
    infos = [_array_info(t, f"{what}: kv_caches[{i}]") for i, t in enumerate(tensors)]
    return tensors, infos


def flash_attn_layout(kv_caches: Sequence[Any], *, kv_planes: int = 2) -> Layout:
    """vLLM's FlashAttention cache: one tensor per layer of logical shape ``[2, num_blocks,
    block_tokens, kv_heads, head_dim]``, stored NHD (as shaped) or HND (strides of a
    ``[2, num_blocks, kv_heads, block_tokens, head_dim]`` tensor viewed through a permute; found
    from the strides). Every layer must have the same shape."""
    _, infos = _paged_layers(kv_caches, "flash_attn_layout")
    first = infos[0]
    labels = ("kv", "num_blocks", "block_tokens", "kv_heads", "head_dim")
    if len(first.shape) != 5:
        raise ValueError(f"flash_attn_layout: kv_caches[0]: expected 5 dimensions {list(labels)}, got shape {list(first.shape)}")
    planes, nb, bt, heads, dim = first.shape
    if planes != kv_planes:
        raise ValueError(f"flash_attn_layout: kv_caches[0]: dimension 0 (kv) is {planes}, expected {kv_planes}")
    es = first.itemsize
    hb = dim * es
    nhd = (bt * heads * hb, heads * hb, hb, es)
    hnd = (bt * heads * hb, hb, bt * hb, es)
    block = bt * heads * hb
    order_hnd = heads > 1 and bt > 1 and first.strides[2] == hb and first.strides[3] == bt * hb
    for i, info in enumerate(infos):
        name = f"flash_attn_layout: kv_caches[{i}]"
        _check_dims(info, name, first.shape, labels)
        if info.itemsize != es:
            raise ValueError(f"{name}: element size {info.itemsize} bytes, kv_caches[0] has {es}")
        _check_strides(info, name, (nb * block, block) + (hnd if order_hnd else nhd)[1:], labels)
    device = _one_device(infos, "flash_attn_layout")
    geometry = {"num_layers": len(infos), "kv_planes": planes, "kv_heads": heads, "head_dim": dim, "element_bytes": es}
    return _kvortex._flash_attn([i.ptr for i in infos], geometry, nb, bt, order_hnd, device)


def flashinfer_layout(kv_caches: Sequence[Any]) -> Layout:
    """FlashInfer's cache: one tensor per layer, ``[num_blocks, 2, block_tokens, kv_heads,
    head_dim]`` (NHD) or ``[num_blocks, 2, kv_heads, block_tokens, head_dim]`` (HND, pass
    ``order``-free: found from the strides of the NHD-shaped view)."""
    _, infos = _paged_layers(kv_caches, "flashinfer_layout")
    first = infos[0]
    labels = ("num_blocks", "kv", "block_tokens", "kv_heads", "head_dim")
    if len(first.shape) != 5:
        raise ValueError(f"flashinfer_layout: kv_caches[0]: expected 5 dimensions {list(labels)}, got shape {list(first.shape)}")
    nb, planes, bt, heads, dim = first.shape
    if planes != 2:
        raise ValueError(f"flashinfer_layout: kv_caches[0]: dimension 1 (kv) is {planes}, expected 2")
    es = first.itemsize
    hb = dim * es
    plane = bt * heads * hb
    order_hnd = heads > 1 and bt > 1 and first.strides[2] == hb and first.strides[3] == bt * hb
    inner = (hb, bt * hb, es) if order_hnd else (heads * hb, hb, es)
    for i, info in enumerate(infos):
        name = f"flashinfer_layout: kv_caches[{i}]"
        _check_dims(info, name, first.shape, labels)
        _check_strides(info, name, (2 * plane, plane) + inner, labels)
    device = _one_device(infos, "flashinfer_layout")
    geometry = {"num_layers": len(infos), "kv_planes": 2, "kv_heads": heads, "head_dim": dim, "element_bytes": es}
    return _kvortex._flashinfer([i.ptr for i in infos], geometry, nb, bt, order_hnd, device)


def mla_layout(kv_caches: Sequence[Any]) -> Layout:
    """vLLM's MLA cache: one tensor per layer, ``[num_blocks, block_tokens, head_dim]``."""
    _, infos = _paged_layers(kv_caches, "mla_layout")
    first = infos[0]
    labels = ("num_blocks", "block_tokens", "head_dim")
    if len(first.shape) != 3:
        raise ValueError(f"mla_layout: kv_caches[0]: expected 3 dimensions {list(labels)}, got shape {list(first.shape)}")
    nb, bt, dim = first.shape
    es = first.itemsize
    for i, info in enumerate(infos):
        name = f"mla_layout: kv_caches[{i}]"
        _check_dims(info, name, first.shape, labels)
        _check_strides(info, name, (bt * dim * es, dim * es, es), labels)
    device = _one_device(infos, "mla_layout")
    geometry = {"num_layers": len(infos), "kv_planes": 1, "kv_heads": 1, "head_dim": dim, "element_bytes": es}
    return _kvortex._mla([i.ptr for i in infos], geometry, nb, bt, device)


def cross_layer_layout(kv_cache: Any, *, blocks_outermost: bool = False) -> Layout:
    """All layers in one tensor: ``[num_layers, 2, num_blocks, block_tokens, kv_heads, head_dim]``,
    or with ``blocks_outermost`` ``[num_blocks, num_layers, 2, block_tokens, kv_heads, head_dim]``."""
    info = _array_info(kv_cache, "cross_layer_layout: kv_cache")
    if blocks_outermost:
        labels = ("num_blocks", "num_layers", "kv", "block_tokens", "kv_heads", "head_dim")
    else:
        labels = ("num_layers", "kv", "num_blocks", "block_tokens", "kv_heads", "head_dim")
    if len(info.shape) != 6:
        raise ValueError(f"cross_layer_layout: kv_cache: expected 6 dimensions {list(labels)}, got shape {list(info.shape)}")
    dims = dict(zip(labels, info.shape))
    _check_strides(info, "cross_layer_layout: kv_cache", _contiguous_strides(info.shape, info.itemsize), labels)
    geometry = {"num_layers": dims["num_layers"], "kv_planes": dims["kv"], "kv_heads": dims["kv_heads"],
                "head_dim": dims["head_dim"], "element_bytes": info.itemsize}
    return _kvortex._cross_layer(info.ptr, geometry, dims["num_blocks"], dims["block_tokens"], blocks_outermost, info.device)


def contiguous_layout(kv_caches: Sequence[Any]) -> Layout:
    """One contiguous cache per layer, ``[kv_planes, max_tokens, kv_heads, head_dim]`` (a simple
    server's cache; block tables may be left ``None``)."""
    _, infos = _paged_layers(kv_caches, "contiguous_layout")
    first = infos[0]
    labels = ("kv", "max_tokens", "kv_heads", "head_dim")
    if len(first.shape) != 4:
        raise ValueError(f"contiguous_layout: kv_caches[0]: expected 4 dimensions {list(labels)}, got shape {list(first.shape)}")
    planes, tokens, heads, dim = first.shape
    for i, info in enumerate(infos):
        name = f"contiguous_layout: kv_caches[{i}]"
        _check_dims(info, name, first.shape, labels)
        _check_strides(info, name, _contiguous_strides(info.shape, info.itemsize), labels)
    device = _one_device(infos, "contiguous_layout")
    geometry = {"num_layers": len(infos), "kv_planes": planes, "kv_heads": heads, "head_dim": dim,
                "element_bytes": first.itemsize}
    return _kvortex._contiguous([i.ptr for i in infos], geometry, tokens, device)


def split_kv_layout(keys: Sequence[Any], values: Sequence[Any], *, block_tokens: int) -> Layout:
    """K and V kept in separate tensors per layer, each ``[num_blocks * block_tokens, kv_heads,
    head_dim]`` (or ``[num_blocks, block_tokens, kv_heads, head_dim]``), contiguous and anywhere in
    memory: transformers' ``PagedAttentionCache`` and SGLang's token pools. ``keys[i]`` and
    ``values[i]`` are layer ``i``. Tensors that overlap can be read (stored from) but not written."""
    if len(keys) != len(values) or not keys:
        raise ValueError(f"split_kv_layout: {len(keys)} key tensors and {len(values)} value tensors")
    kinfo = [_array_info(t, f"split_kv_layout: keys[{i}]") for i, t in enumerate(keys)]
    vinfo = [_array_info(t, f"split_kv_layout: values[{i}]") for i, t in enumerate(values)]
    first = kinfo[0]
    if len(first.shape) == 4:
        nb, bt, heads, dim = first.shape
        if bt != block_tokens:
            raise ValueError(f"split_kv_layout: keys[0]: dimension 1 (block_tokens) is {bt}, expected {block_tokens}")
    elif len(first.shape) == 3:
        slots, heads, dim = first.shape
        if slots % block_tokens:
            raise ValueError(f"split_kv_layout: keys[0]: dimension 0 (slots) is {slots}, not a multiple of block_tokens {block_tokens}")
        nb = slots // block_tokens
    else:
        raise ValueError(f"split_kv_layout: keys[0]: expected 3 dimensions [slots, kv_heads, head_dim], got shape {list(first.shape)}")
    es = first.itemsize
    labels = ("slots",) * (len(first.shape) - 2) + ("kv_heads", "head_dim")
    for i, (k, v) in enumerate(zip(kinfo, vinfo)):
        for name, info in ((f"split_kv_layout: keys[{i}]", k), (f"split_kv_layout: values[{i}]", v)):
            if info.shape != first.shape:
                raise ValueError(f"{name}: shape {list(info.shape)}, keys[0] has {list(first.shape)}")
            if info.itemsize != es:
                raise ValueError(f"{name}: element size {info.itemsize} bytes, keys[0] has {es}")
            _check_strides(info, name, _contiguous_strides(info.shape, es), labels)
    device = _one_device(kinfo + vinfo, "split_kv_layout")
    geometry = {"num_layers": len(kinfo), "kv_planes": 2, "kv_heads": heads, "head_dim": dim, "element_bytes": es}
    return _kvortex._split_kv([k.ptr for k in kinfo], [v.ptr for v in vinfo], geometry, nb, block_tokens, False, device)
