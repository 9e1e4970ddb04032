"""KVortex under Hugging Face transformers' ``DynamicCache``: save a prompt's KV after its prefill,
and on a later request with the same prefix build the cache from KVortex and run the model on the
uncached tail only.

    from kvortex.integrations.transformers import PrefixStore
    store = PrefixStore(engine, model.config)          # engine: kvortex.Engine(..., stack="gpu")
    out = model(input_ids, use_cache=True)
    store.save(input_ids[0], out.past_key_values)      # after the prefill
    ...
    cache, hit = store.restore(input_ids[0])           # later: (DynamicCache or None, tokens restored)
    out = model(input_ids[:, hit:], past_key_values=cache, use_cache=True)

``save`` stores after the forward pass (one store of every layer, through a staging tensor);
``saving_cache(input_ids)`` is a ``DynamicCache`` to pass to the prefill instead, which stores each
layer as the forward pass computes it (from its ``update``), overlapped with the later layers; ``restore`` fills
a staging tensor ``[layers, 2, kv_heads, tokens, head_dim]`` through one layer-by-layer retrieve and
builds the ``DynamicCache`` from it (transformers copies each layer's K and V into tensors of its
own, ``[1, kv_heads, tokens, head_dim]``, so the staging tensor is freed afterwards). Only whole chunks are kept, and the last prompt token
is always left to the model, so the forward pass over the tail yields the next token's logits.
Batch size 1 per call. PyTorch is imported here, not by ``kvortex`` itself.

``PagedCacheStore`` does the same under continuous batching (``generate_batch``, its
``PagedAttentionCache``): while ``installed()`` is active, the paged caches transformers creates
look a request's prefix up in KVortex beyond what its own GPU prefix cache holds, restore those
blocks into the paged cache, and store every block a forward pass completes::

    store = PagedCacheStore(engine, model.config)
    with store.installed():
        outputs = model.generate_batch(prompts, generation_config=gen)
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

import kvortex

_log = logging.getLogger("kvortex.integrations.transformers")


def _kv_shape(config: Any) -> Tuple[int, int, int]:
    layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return layers, heads, dim


def _matching_shape(engine: kvortex.Engine, config: Any, who: str) -> Tuple[int, int, int]:
    layers, heads, dim = _kv_shape(config)
    g = engine.geometry
    if (g["num_layers"], g["kv_heads"], g["head_dim"]) != (layers, heads, dim):
        raise ValueError(f"{who}: the engine holds {g['num_layers']} layers x {g['kv_heads']} KV heads x "
                         f"{g['head_dim']}, the model has {layers} x {heads} x {dim}")
    return layers, heads, dim


def engine_settings(config: Any, *, capacity_bytes: Any, dtype: torch.dtype = torch.bfloat16, chunk_tokens: int = 256,
                    model_id: str = "", **extra: Any) -> dict:
    """Settings for a `kvortex.Engine` that holds this model's KV (geometry from its config)."""
    layers, heads, dim = _kv_shape(config)
    element = torch.empty((), dtype=dtype).element_size()
    settings = {
        "capacity_bytes": capacity_bytes,
        "chunk_tokens": chunk_tokens,
        "block_tokens": chunk_tokens,
        "ns": {"model_id": model_id or str(getattr(config, "_name_or_path", "") or config.model_type),
               "dtype": str(dtype).replace("torch.", "")},
        "geometry": {"num_layers": layers, "kv_heads": heads, "head_dim": dim, "element_bytes": element},
    }
    settings.update(extra)
    return settings


class PrefixStore:
    """Saves and restores a `DynamicCache`'s prompt prefix through a `kvortex.Engine` whose
    geometry matches the model (see `engine_settings`)."""

    def __init__(self, engine: kvortex.Engine, config: Any):
        self.engine = engine
        self.config = config
        self.layers, self.heads, self.dim = _matching_shape(engine, config, "PrefixStore")
        self.chunk = engine.chunk_tokens
        self._pending: List[Any] = []  # (ticket, (staging, events)): stores still reading their staging tensors
        self._reaped = 0  # tokens of saves done before a flush saw them
        self._errors: List[Exception] = []

    @staticmethod
    def _ids(input_ids: Any) -> Any:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 1:
                raise ValueError(f"PrefixStore: input_ids must be 1-D (one sequence), got shape {list(input_ids.shape)}")
            return input_ids.detach().to("cpu", torch.int64).numpy()
        return input_ids

    def _staging(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        # [layers, K|V, heads, tokens, dim]: per layer one HND block holding every token.
        return torch.empty((self.layers, 2, self.heads, tokens, self.dim), dtype=like.dtype, device=like.device)

    def _layout(self, staging: torch.Tensor) -> kvortex.Layout:
        # Seen as a FlashAttention cache of one block of `tokens` slots, stored HND.
        views = [staging[i].unsqueeze(1).transpose(2, 3) for i in range(self.layers)]  # [2, 1, tokens, heads, dim]
        return kvortex.flash_attn_layout(views)

    @staticmethod
    def _stage(staging: torch.Tensor, layer: int, keys: Any, values: Any, n: int) -> Optional[Any]:
        # Copies one layer's first n tokens into the staging tensor on the current stream; returns
        # the CUDA event a store of them must wait for (None on the host).
        staging[layer, 0].copy_(keys[0, :, :n])  # [heads, seq, dim]
        staging[layer, 1].copy_(values[0, :, :n])
        if not staging.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _queue(self, ticket: Any, keep: Any) -> None:
        # `keep` (the staging tensor, the events) lives until the copies are done.
        self._reap()
        self._pending.append((ticket, keep))

    def save(self, input_ids: Any, cache: Any, *, wait: bool = True) -> int:
        """Stores the KV of the whole chunks of `input_ids` held in `cache` (a `DynamicCache` after a
        forward pass over at least those tokens); returns the tokens newly written. With
        ``wait=False`` it returns once the copies are queued (0): the first token need not wait
        for them; `flush()` (or the next `restore`) waits."""
        ids = self._ids(input_ids)
        n = (len(ids) // self.chunk) * self.chunk
        if n == 0:
            return 0
        layers = cache.layers if hasattr(cache, "layers") else None
        if layers is None or len(layers) != self.layers:
            raise ValueError(f"PrefixStore.save: expected a DynamicCache of {self.layers} layers")
        first = layers[0].keys
        if first.shape[0] != 1 or first.shape[2] < n:
            raise ValueError(f"PrefixStore.save: cache keys of shape {list(first.shape)} do not hold {n} tokens of one sequence")
        staging = self._staging(n, first)
        event = None
        for i, layer in enumerate(layers):
            event = self._stage(staging, i, layer.keys, layer.values, n)  # the last layer's event covers all
        ticket = self.engine.store(ids[:n], self._layout(staging), None, event.cuda_event if event is not None else 0)
        if not wait:
            self._queue(ticket, (staging, event))
            return 0
        return ticket.wait()

    def _reap(self) -> None:
        # Frees the staging tensors of saves already done, so saves that nobody flushes do not
        # hold GPU memory; their tokens are counted into the next flush.
        keep = []
        for entry in self._pending:
            if entry[0].ready():
                try:
                    self._reaped += entry[0].wait()
                except kvortex.Error as e:
                    self._errors.append(e)
            else:
                keep.append(entry)
        self._pending = keep

    def saving_cache(self, input_ids: Any) -> Any:
        """A `DynamicCache` that stores the whole chunks of `input_ids` layer by layer while the
        forward pass computes them: pass it as `past_key_values` to the prefill. When the forward
        pass has written layer i's KV for those tokens (its `update`), they are copied into a
        staging tensor on the current stream and layer i's store is submitted after that stream's
        event, so the copies to host memory overlap the later layers' compute and the first token
        does not wait for them. `flush()` waits for the stores. Batch size 1."""
        from transformers import DynamicCache

        ids = self._ids(input_ids)
        n = (len(ids) // self.chunk) * self.chunk
        store = self

        class _SavingCache(DynamicCache):
            def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any):
                keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                store._save_layer(self, layer_idx, keys, values)
                return keys, values

        cache = _SavingCache(config=self.config)
        cache._kvortex_save = {"ids": ids[:n], "n": n, "op": None, "staging": None, "done": set(), "failed": False,
                               "events": []}
        return cache

    def _save_layer(self, cache: Any, layer: int, keys: Any, values: Any) -> None:
        st = cache._kvortex_save
        n = st["n"]
        if keys.shape[0] != 1:
            raise ValueError(f"PrefixStore.saving_cache: batch size 1 only, the forward pass has {keys.shape[0]}")
        # Layers whose cache returns fewer than n tokens (sliding windows split over forwards) are
        # never complete: the store is then not finished and nothing of it is published.
        if n == 0 or st["failed"] or layer in st["done"] or keys.shape[2] < n:
            return
        try:
            if st["op"] is None:
                st["staging"] = self._staging(n, keys)
                st["op"] = self.engine.begin_store(st["ids"], self._layout(st["staging"]))
            event = self._stage(st["staging"], layer, keys, values, n)
            st["events"].append(event)
            st["op"].submit_layer(layer, event=event.cuda_event if event is not None else 0)
            st["done"].add(layer)
            if len(st["done"]) == self.layers:
                self._queue(st["op"].finish(), (st["staging"], st["events"]))
                st["op"] = None
        except kvortex.Error as e:  # the forward pass goes on; the save is dropped (its layers rolled back)
            _log.warning("kvortex layer-by-layer save failed: %s", e)
            st["failed"] = True
            st["op"] = None
            self._errors.append(e)

    def flush(self) -> int:
        """Waits for the stores `save(wait=False)` and `saving_cache` queued; returns the tokens they
        wrote. Every store is waited for and forgotten; then the first error any of them (or a
        layer-by-layer save since the last flush) met is raised, as `kvortex.Error`."""
        done, self._reaped = self._reaped, 0
        pending, self._pending = self._pending, []
        for ticket, _ in pending:
            try:
                done += ticket.wait()
            except kvortex.Error as e:
                self._errors.append(e)
        errors, self._errors = self._errors, []
        if errors:
            raise errors[0]
        return done

    def lookup(self, input_ids: Any) -> int:
        """Tokens of `input_ids` that `restore` would bring back (whole chunks, the last token left out)."""
        ids = self._ids(input_ids)
        return self._usable(self.engine.lookup(ids), len(ids))

    def _usable(self, hit: int, length: int) -> int:
        hit = min(hit, length - 1)  # the model must see at least one token to produce logits
        return (hit // self.chunk) * self.chunk

    def restore(self, input_ids: Any, *, device: Any = "cuda", dtype: torch.dtype = torch.bfloat16
                ) -> Tuple[Optional[Any], int]:
        """Builds a `DynamicCache` holding the stored prefix of `input_ids`; returns it and the
        tokens it holds (None and 0 on a miss). Run the model on `input_ids[hit:]` with it."""
        from transformers import DynamicCache

        try:
            self.flush()  # a save queued earlier may hold chunks of this prompt
        except kvortex.Error as e:
            _log.warning("kvortex save failed: %s", e)
        ids = self._ids(input_ids)
        hit = self._usable(self.engine.lookup(ids), len(ids))
        if hit == 0:
            return None, 0
        like = torch.empty((), dtype=dtype, device=device)
        staging = self._staging(hit, like)
        stream = torch.cuda.current_stream() if staging.is_cuda else None
        op = self.engine.begin_retrieve(ids[:hit], self._layout(staging))
        for i in range(self.layers):
            op.submit_layer(i, stream=stream.cuda_stream if stream is not None else 0)
        got = op.finish().wait()
        got = (got // self.chunk) * self.chunk
        if got == 0:
            return None, 0
        if got < hit:  # a tier could not deliver everything: keep what came
            staging = staging[:, :, :, :got]
        pairs = [(staging[i, 0].unsqueeze(0), staging[i, 1].unsqueeze(0)) for i in range(self.layers)]
        try:
            cache = DynamicCache(ddp_cache_data=pairs, config=self.config)
        except TypeError:
            cache = DynamicCache(ddp_cache_data=pairs)
        return cache, got


_installed_lock = threading.Lock()
_installed: Optional["PagedCacheStore"] = None  # the store whose cache class is in place


class PagedCacheStore:
    """KVortex below transformers' continuous batching (`generate_batch`, `init_continuous_batching`,
    `continuous_batching_context_manager`), over its `PagedAttentionCache`: per layer separate K and
    V tensors `[(num_blocks + 2) * block_size, kv_heads, head_dim]` (a `split_kv_layout`), block
    tables per request, and a GPU-only prefix cache.

    transformers has no public hook for an external KV store, so `installed()` swaps the
    `PagedAttentionCache` class that `continuous_api` creates for a subclass with three overrides
    (transformers 5.17):

    - `search_prefix_match(request_id, prompt_ids)`, which the scheduler calls when it considers a
      waiting request: after transformers' own GPU match, the rest of the prompt (all but its last
      token) is looked up in KVortex (once per request: a miss is remembered). Blocks are allocated
      for the part found beyond the GPU match and, once the work already queued on the device is
      done (a request freed in this step may still be read or written by the batch in flight),
      restored into the paged cache before the request's first forward pass, then marked complete
      (so transformers' prefix cache shares them too); the match returned covers them. A restore
      that comes back short (a chunk evicted or a tier failing since the lookup) keeps what
      arrived, whole blocks only, and frees the rest. A lookup or restore that fails is a miss.
    - `mark_shareable_blocks_as_complete(state, n)`, called after each forward pass: the request's
      leading complete blocks, in whole chunks, are stored (chunks KVortex holds are skipped); for a
      request that just finished, every block its computed tokens fill.
    - `free_blocks(request_id)`: waits for that request's stores before its blocks can be reused.

    Hits are whole chunks and whole blocks (the least common multiple of `engine.chunk_tokens`
    and the cache's `block_size`). The engine's geometry must match the model's (see
    `engine_settings`). Only caches created for this store's model config (the object given here)
    use KVortex. Caches that do not share prefixes (`allow_block_sharing=False`, sliding window
    layers) or run tensor parallel are left as they are, with a warning, and `stats()["disabled"]`
    says why. `salt` (bytes) separates this store's keys from every other prompt's, e.g. per
    tenant. `store_generated=False` stores prompt tokens only. One store is installed at a time in
    a process (`installed()` raises `RuntimeError` otherwise)."""

    def __init__(self, engine: kvortex.Engine, config: Any, *, salt: Optional[bytes] = None,
                 store_generated: bool = True):
        self.engine = engine
        self.config = config
        self.layers, self.heads, self.dim = _matching_shape(engine, config, "PagedCacheStore")
        self.chunk = engine.chunk_tokens
        self.salt = salt
        self.store_generated = store_generated
        self._lock = threading.Lock()
        self._caches: "weakref.WeakSet[Any]" = weakref.WeakSet()  # the paged caches bound to this store
        self._stats = {"lookups": 0, "lookup_hit_tokens": 0, "lookup_errors": 0, "restored_tokens": 0,
                       "restored_requests": 0, "short_restores": 0, "no_free_blocks": 0, "stored_tokens": 0,
                       "store_errors": 0, "disabled": ""}

    def stats(self) -> Dict[str, Any]:
        """Counters: lookups made, tokens they found beyond the GPU match, lookups that failed,
        tokens and requests restored, restores that came back short, hits dropped for want of free
        blocks, tokens newly stored, stores that failed, and why the store was disabled for a cache
        ("" when it never was)."""
        with self._lock:
            return dict(self._stats)

    @contextlib.contextmanager
    def installed(self) -> Iterator["PagedCacheStore"]:
        """Paged caches transformers creates inside this block for this store's model use KVortex
        (and keep using it afterwards, e.g. a persistent manager's)."""
        from transformers.generation.continuous_batching import continuous_api

        global _installed
        with _installed_lock:
            if _installed is not None:
                raise RuntimeError("PagedCacheStore.installed(): another PagedCacheStore is installed")
            original = continuous_api.PagedAttentionCache
            continuous_api.PagedAttentionCache = self._cache_class(original)
            _installed = self
        try:
            yield self
        finally:
            with _installed_lock:
                continuous_api.PagedAttentionCache = original
                _installed = None

    def flush(self) -> None:
        """Waits for every store in flight (they stay registered until their request's blocks are freed)."""
        with self._lock:
            pending = [e for c in self._caches for es in c._kvortex["pending"].values() for e in es]
        for e in pending:
            self._wait_store(e)

    # -- the overrides' bodies ------------------------------------------------------------------

    def _cache_class(self, base: type) -> type:
        store = self

        class KVortexPagedAttentionCache(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                config = kwargs.get("config", args[0] if args else None)
                dtype = kwargs.get("dtype", args[5] if len(args) > 5 else None)
                mine = store._owns(config)
                if mine and dtype is not None:  # before the cache's memory is taken
                    store._check_element(torch.empty((), dtype=dtype).element_size())
                super().__init__(*args, **kwargs)
                helper = kwargs.get("distributed_helper", args[3] if len(args) > 3 else None)
                self._kvortex = store._bind(self, getattr(helper, "tp_size", 1)) if mine else None

            def search_prefix_match(self, request_id: str, prompt_ids: List[int]) -> int:
                matched = super().search_prefix_match(request_id, prompt_ids)
                if self._kvortex is None:
                    return matched
                return store._extend_match(self, request_id, prompt_ids, matched)

            def mark_shareable_blocks_as_complete(self, state: Any, num_complete_blocks: int) -> None:
                super().mark_shareable_blocks_as_complete(state, num_complete_blocks)
                if self._kvortex is not None:
                    store._store_complete(self, state)

            def free_blocks(self, request_id: str) -> None:
                if self._kvortex is not None:
                    store._before_free(self, request_id)
                super().free_blocks(request_id)

        KVortexPagedAttentionCache.__qualname__ = f"KVortex{base.__qualname__}"
        return KVortexPagedAttentionCache

    def _owns(self, config: Any) -> bool:
        if config is None:
            return False
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        if config is self.config or config is text:
            return True
        _log.warning("kvortex PagedCacheStore: a paged cache for another model's config is left as it is")
        return False

    def _check_element(self, element: int) -> None:
        if element != self.engine.geometry["element_bytes"]:
            raise ValueError(f"PagedCacheStore: the paged cache has {element}-byte elements, the engine "
                             f"{self.engine.geometry['element_bytes']}")

    def _disable(self, why: str) -> None:
        _log.warning("kvortex PagedCacheStore disabled: %s", why)
        with self._lock:
            self._stats["disabled"] = why

    def _bind(self, cache: Any, tp_size: int) -> Optional[Dict[str, Any]]:
        if not cache.use_prefix_sharing:
            self._disable("the paged cache does not share prefixes (allow_block_sharing off, or sliding-window layers)")
            return None
        if tp_size > 1:
            self._disable(f"tensor parallel caches (tp_size {tp_size}) need one engine per rank")
            return None
        if len(cache.key_cache) != self.layers or cache.num_key_value_heads != self.heads or cache.head_dim != self.dim:
            raise ValueError(f"PagedCacheStore: the paged cache holds {len(cache.key_cache)} layers x "
                             f"{cache.num_key_value_heads} KV heads x {cache.head_dim}, the engine {self.layers} x "
                             f"{self.heads} x {self.dim}")
        self._check_element(cache.key_cache[0].element_size())
        block = int(cache.block_size)
        with self._lock:
            self._caches.add(cache)
        # Per request id: store tickets [ticket, counted] still reading its blocks, tokens stored
        # (or restored) so far, and the prompt length a lookup found nothing more for.
        return {"layout": kvortex.split_kv_layout(cache.key_cache, cache.value_cache, block_tokens=block),
                "block": block, "unit": self.chunk * block // math.gcd(self.chunk, block),
                "pending": {}, "stored_upto": {}, "missed": {}}

    def _count(self, **delta: int) -> None:
        with self._lock:
            for k, v in delta.items():
                self._stats[k] += v

    def _extend_match(self, cache: Any, request_id: str, prompt_ids: List[int], matched: int) -> int:
        kv = cache._kvortex
        block, unit = kv["block"], kv["unit"]
        limit = len(prompt_ids) - 1  # the model computes at least the last prompt token
        if limit - matched < unit:
            return matched
        with self._lock:
            if kv["missed"].get(request_id) == len(prompt_ids):  # asked again while the request waits
                return matched
        ids = torch.tensor(prompt_ids[:limit], dtype=torch.int64).numpy()
        try:
            found = self.engine.lookup(ids, salt=self.salt)
        except kvortex.Error as e:
            _log.warning("kvortex lookup for request %s failed: %s", request_id, e)
            self._count(lookup_errors=1)
            found = 0
        hit = (min(found, limit) // unit) * unit
        self._count(lookups=1, lookup_hit_tokens=max(hit - matched, 0))
        if hit <= matched:
            with self._lock:
                kv["missed"][request_id] = len(prompt_ids)
            return matched
        cm = cache.group_cache_managers[0]
        first_new = matched // block
        want = hit // block - first_new
        if cm.allocate_blocks(want, request_id, cache._block_manager) is None:
            self._count(no_free_blocks=1)
            return matched
        blocks = cm.block_table[request_id]
        table = [-1] * first_new + blocks[first_new:first_new + want]
        if cache.key_cache[0].is_cuda:
            # The blocks may have been freed in this step while the batch still in flight (async
            # batching, CPU offloading) reads or writes them: let that work finish first.
            torch.cuda.synchronize(cache.key_cache[0].device)
        try:
            got = self.engine.retrieve(ids[:hit], kv["layout"], table, salt=self.salt).wait()
        except kvortex.Error as e:
            _log.warning("kvortex restore of request %s failed: %s", request_id, e)
            got = 0
        usable = max((got // block) * block, matched)
        keep = usable // block
        if keep < first_new + want:  # blocks that did not come up go back, incomplete
            extra = blocks[keep:]
            del blocks[keep:]
            cache._block_manager.free_blocks(extra, shareable=cm.uses_block_sharing)
            self._count(short_restores=1)
        if usable > matched:
            cache._block_manager.mark_shareable_blocks_as_complete(
                num_complete_blocks=keep - first_new, allocated_blocks=blocks, prompt_ids=prompt_ids)
            self._count(restored_tokens=usable - matched, restored_requests=1)
            with self._lock:
                kv["stored_upto"][request_id] = usable
        return usable

    def _store_complete(self, cache: Any, state: Any) -> None:
        kv = cache._kvortex
        block = kv["block"]
        rid = state.request_id
        blocks = cache.group_cache_managers[0].block_table.get(rid)
        if not blocks:
            return
        with self._lock:
            upto = kv["stored_upto"].get(rid, 0)
        by_id = cache._block_manager._id_to_block
        complete = min(upto // block, len(blocks))  # complete blocks never become incomplete again
        while complete < len(blocks):
            entry = by_id.get(blocks[complete])
            if entry is None or not entry.is_complete:
                break
            complete += 1
        seq = state.initial_tokens + state.generated_tokens
        if getattr(state.status, "name", "") == "FINISHED":
            # transformers marks no block of a finished request complete, though its KV is
            # computed for every token but the last generated one.
            complete = max(complete, min(len(blocks), (len(seq) - 1) // block))
        tokens = complete * block
        if not self.store_generated:
            tokens = min(tokens, len(state.initial_tokens))
        tokens = (tokens // self.chunk) * self.chunk
        if tokens <= upto or len(seq) < tokens:
            return
        with self._lock:
            kv["stored_upto"][rid] = tokens
        ids = torch.tensor(seq[:tokens], dtype=torch.int64).numpy()
        table = blocks[: -(-tokens // block)]
        try:
            ticket = self.engine.store(ids, kv["layout"], table, salt=self.salt)
        except kvortex.Error as e:
            _log.warning("kvortex store of request %s failed: %s", rid, e)
            self._count(store_errors=1)
            return
        with self._lock:
            kv["pending"].setdefault(rid, []).append([ticket, False])

    def _wait_store(self, entry: List[Any]) -> None:
        try:
            tokens = entry[0].wait()
        except kvortex.Error as e:
            tokens = None
            err = e
        with self._lock:
            if entry[1]:
                return
            entry[1] = True
            if tokens is None:
                self._stats["store_errors"] += 1
            else:
                self._stats["stored_tokens"] += tokens
        if tokens is None:
            _log.warning("kvortex store failed: %s", err)

    def _before_free(self, cache: Any, request_id: str) -> None:
        kv = cache._kvortex
        with self._lock:
            pending = kv["pending"].pop(request_id, [])
            kv["stored_upto"].pop(request_id, None)
            kv["missed"].pop(request_id, None)
        for e in pending:
            self._wait_store(e)
