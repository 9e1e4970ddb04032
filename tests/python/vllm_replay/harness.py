"""The replay: vLLM v0.16.0's KV cache manager, scheduler and model runner, as far as a KV
connector sees them, around real KVortexConnector instances.

What each part mirrors (vLLM v0.16.0 files and functions):

- ``BlockManager``: ``vllm/v1/core/kv_cache_manager.py`` ``KVCacheManager.get_computed_blocks``
  (full blocks only, capped below the last token), ``allocate_slots`` (new computed blocks touched,
  blocks for local + external + new tokens, full blocks cached at once unless
  ``delay_cache_blocks``), ``get_blocks``, ``cache_blocks``, ``free``; ``vllm/v1/core/block_pool.py``
  (a free queue whose cached blocks are evicted when reused); block hashes chained over full
  blocks with the LoRA name, multimodal identifiers and ``cache_salt`` as extra keys
  (``vllm/v1/core/kv_cache_utils.py`` ``hash_block_tokens``).
- ``Scheduler``: ``vllm/v1/core/sched/scheduler.py`` ``Scheduler.schedule`` (running requests
  first, preempting from the back when a block allocation fails; no waiting request scheduled in a
  step that preempted; for waiting requests ``_update_waiting_for_remote_kv``, the local hit,
  ``get_num_new_matched_tokens`` with ``None`` skipping the request, ``allocate_slots``,
  ``update_state_after_alloc`` for every allocated request, ``WAITING_FOR_REMOTE_KVS`` for async
  loads; the token budget and ``long_prefill_token_threshold`` for chunked prefill;
  ``build_connector_meta`` once per step before ``_update_after_schedule``),
  ``update_from_output`` (``_handle_invalid_blocks`` with the ``recompute`` policy, the sampled
  token, ``_free_request`` -> ``request_finished``, ``_update_from_kv_xfer_finished`` ->
  ``update_connector_output``, blocks freed on ``finished_sending``), ``_preempt_request``,
  ``finish_requests`` (aborts); ``vllm/distributed/kv_transfer/kv_connector/utils.py``
  ``KVOutputAggregator`` (an id is finished once every rank reported it; invalid blocks unioned).
- ``Worker``: ``vllm/v1/worker/gpu_model_runner.py`` ``GPUModelRunner.execute_model``
  (``handle_preemptions`` first, then ``_update_states``; ``kv_connector_no_forward`` when nothing
  is scheduled), ``vllm/v1/worker/kv_connector_model_runner_mixin.py``
  ``_get_kv_connector_output`` (bind, ``start_load_kv``, then on exit ``wait_for_save``,
  ``get_finished``, ``get_block_ids_with_load_errors``, ``clear_connector_metadata``),
  ``vllm/model_executor/layers/attention/kv_transfer_utils.py`` ``maybe_transfer_kv_layer``
  (per layer: the new tokens' KV written by the cache-update op, ``wait_for_layer_load``, attention,
  ``save_kv_layer``).

Not mirrored: asynchronous scheduling (step N+1 scheduled before step N's output), pipeline
parallelism, the hybrid allocator, speculative decoding, CUDA graphs. The "model" writes, for each
token, KV bytes that are a function of the tokens up to it, the layer and the rank; attention
checks every earlier token's KV in the request's blocks against that function.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .shapes import (CachedRequestData, CacheConfig, ForwardContext, KVCacheBlocks, KVCacheConfig,
                     KVConnectorOutput, KVTransferConfig, ModelConfig, NewRequestData, ParallelConfig,
                     Request, RequestStatus, SchedulerOutput, VllmConfig)

# ---- the stand-in model ------------------------------------------------------------------------


def prefix_hashes(tokens) -> np.ndarray:
    """A 64-bit hash of tokens[0..p] for every position p."""
    out = np.empty(len(tokens), dtype=np.uint64)
    h = 0xCBF29CE484222325
    for i, t in enumerate(tokens):
        h = ((h ^ (int(t) & 0xFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
        out[i] = h
    return out


def expected_kv(hashes: np.ndarray, layer: int, rank: int, heads: int, dim: int) -> np.ndarray:
    """The KV the model writes for these positions: [n, 2, heads, dim] uint16."""
    n = len(hashes)
    salt = np.uint64((layer + 1) * 0x9E3779B97F4A7C15 % (1 << 64) ^ (rank + 1) * 0xC2B2AE3D27D4EB4F % (1 << 64))
    idx = np.arange(2 * heads * dim, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (hashes[:, None] ^ salt) + idx[None, :] * np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
    return (x & np.uint64(0xFFFF)).astype(np.uint16).reshape(n, 2, heads, dim)


def next_token(tokens) -> int:
    return int(hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:6], 16) % 30000 + 7


# ---- vLLM's KV cache manager ----------------------------------------------------------------------


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[Any] = [None] * num_blocks
        self.cached: dict[Any, int] = {}
        self.free_queue: collections.OrderedDict[int, None] = collections.OrderedDict((b, None) for b in range(num_blocks))
        self.req_blocks: dict[str, list[int]] = {}

    def block_hashes(self, req: Request, upto: int) -> list:
        extra = (getattr(req.lora_request, "lora_name", None),
                 tuple(f.identifier for f in req.mm_features), req.cache_salt)
        out, parent = [], None
        toks = req.all_token_ids
        for b in range(upto // self.block_size):
            parent = hashlib.sha256(repr((parent, toks[b * self.block_size:(b + 1) * self.block_size],
                                          extra)).encode()).digest()
            out.append(parent)
        return out

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        if not self.prefix_caching:
            return [], 0
        blocks = []
        for h in self.block_hashes(req, req.num_tokens - 1):
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks, len(blocks) * self.block_size

    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            self.free_queue.pop(b, None)
        self.ref[b] += 1

    def allocate_slots(self, req: Request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       new_computed_blocks: list[int] | None = None, num_external_computed_tokens: int = 0,
                       delay_cache_blocks: bool = False) -> KVCacheBlocks | None:
        new_computed_blocks = new_computed_blocks or []
        have = self.req_blocks.get(req.request_id, [])
        total = req.num_computed_tokens + num_new_computed_tokens + num_external_computed_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(have) - len(new_computed_blocks)
        reusable = sum(1 for b in new_computed_blocks if self.ref[b] == 0)
        if need > len(self.free_queue) - reusable:
            return None
        for b in new_computed_blocks:
            self._take(b)
        fresh = []
        for _ in range(max(0, need)):
            b, _ = self.free_queue.popitem(last=False)
            if self.hash_of[b] is not None:  # evicted from the prefix cache
                self.cached.pop(self.hash_of[b], None)
                self.hash_of[b] = None
            self.ref[b] = 1
            fresh.append(b)
        self.req_blocks[req.request_id] = have + new_computed_blocks + fresh
        if not delay_cache_blocks:
            self.cache_blocks(req, min(total, req.num_tokens))
        return KVCacheBlocks(fresh)

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        if not self.prefix_caching:
            return
        blocks = self.req_blocks.get(req.request_id, [])
        for b, h in zip(blocks, self.block_hashes(req, num_tokens)):
            if self.hash_of[b] is None and h not in self.cached:
                self.hash_of[b] = h
                self.cached[h] = b

    def get_blocks(self, req_id: str) -> KVCacheBlocks:
        return KVCacheBlocks(list(self.req_blocks.get(req_id, [])))

    def get_block_ids(self, req_id: str) -> tuple:
        return (list(self.req_blocks.get(req_id, [])),)

    def free(self, req: Request) -> None:
        for b in reversed(self.req_blocks.pop(req.request_id, [])):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_queue[b] = None

    def uncache(self, blocks) -> None:
        for b in blocks:
            if self.hash_of[b] is not None:
                self.cached.pop(self.hash_of[b], None)
                self.hash_of[b] = None

    @property
    def num_free(self) -> int:
        return len(self.free_queue)


# ---- the scheduler ---------------------------------------------------------------------------------


class Scheduler:
    def __init__(self, connector, blocks: BlockManager, world_size: int, token_budget: int = 4096,
                 long_prefill_token_threshold: int = 0):
        self.connector, self.kv, self.world_size = connector, blocks, world_size
        self.token_budget, self.threshold = token_budget, long_prefill_token_threshold
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_req_ids: set[str] = set()
        self.finished_recving_kv_req_ids: set[str] = set()
        self.failed_recving_kv_req_ids: set[str] = set()
        self.delayed: set[str] = set()
        self.reports: collections.Counter = collections.Counter()
        self.finished: list[Request] = []
        self.external_hits: dict[str, int] = {}
        self.discarded_steps: collections.Counter = collections.Counter()
        self.last_scheduled: dict[str, int] = {}
        self.last_affected: set[str] = set()
        self.invalid_blocks_seen: set[int] = set()

    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_requests(self) -> bool:
        return bool(self.waiting or self.running or self.finished_req_ids)

    def _preempt(self, req: Request, preempted: set) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
        preempted.add(req.request_id)

    def _update_waiting_for_remote_kv(self, req: Request) -> bool:
        if req.request_id not in self.finished_recving_kv_req_ids:
            return False
        if req.request_id in self.failed_recving_kv_req_ids:
            self.failed_recving_kv_req_ids.discard(req.request_id)
            if req.num_computed_tokens:
                self.kv.cache_blocks(req, req.num_computed_tokens)
            else:
                self.kv.free(req)
        else:
            n = min(len(self.kv.req_blocks.get(req.request_id, [])) * self.kv.block_size, req.num_tokens)
            if n == req.num_tokens:
                n -= 1
            self.kv.cache_blocks(req, n)
            req.num_computed_tokens = n
        self.finished_recving_kv_req_ids.discard(req.request_id)
        return True

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        num_scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        preempted: set[str] = set()
        new_reqs, resumed, running_sched = [], [], []
        for req in list(self.running):
            if req not in self.running or budget <= 0:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.threshold:
                n = min(n, self.threshold)
            if n <= 0:
                continue
            while True:
                got = self.kv.allocate_slots(req, n)
                if got is not None:
                    break
                victim = self.running[-1]
                self._preempt(victim, preempted)
                if victim is req:
                    break
            if req.request_id in preempted:
                continue
            num_scheduled[req.request_id] = n
            new_blocks[req.request_id] = got.block_ids
            running_sched.append(req)
            budget -= n
        skipped: list[Request] = []
        while self.waiting and budget > 0 and not preempted:
            req = self.waiting[0]
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                if not self._update_waiting_for_remote_kv(req):
                    skipped.append(self.waiting.popleft())
                    continue
                req.status = RequestStatus.PREEMPTED if req.num_preemptions else RequestStatus.WAITING
            load_async = False
            if req.num_computed_tokens == 0:
                computed_blocks, local = self.kv.get_computed_blocks(req)
                ext, load_async = self.connector.get_num_new_matched_tokens(req, local)
                if ext is None:
                    skipped.append(self.waiting.popleft())
                    continue
                req.num_external_computed_tokens = ext
                computed = local + ext
            else:
                computed_blocks, local, ext, computed = [], 0, 0, req.num_computed_tokens
            if load_async:
                assert ext > 0
                n = 0
            else:
                n = req.num_tokens - computed
                if self.threshold:
                    n = min(n, self.threshold)
                n = min(n, budget)
                assert n > 0, "a synchronous hit must leave a token to compute"
            got = self.kv.allocate_slots(req, n, local, computed_blocks, ext, delay_cache_blocks=load_async)
            if got is None:
                break
            self.connector.update_state_after_alloc(req, self.kv.get_blocks(req.request_id), ext)
            self.waiting.popleft()
            if ext:
                self.external_hits[req.request_id] = self.external_hits.get(req.request_id, 0) + ext
            if load_async:
                req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                skipped.append(req)
                continue
            was_preempted = req.status == RequestStatus.PREEMPTED
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed
            self.running.append(req)
            (resumed if was_preempted else new_reqs).append(req)
            num_scheduled[req.request_id] = n
            budget -= n
        for req in reversed(skipped):
            self.waiting.appendleft(req)
        cached = CachedRequestData()
        for req in resumed:
            cached.req_ids.append(req.request_id)
            cached.resumed_req_ids.add(req.request_id)
            cached.new_block_ids.append(self.kv.get_block_ids(req.request_id))
            cached.num_computed_tokens.append(req.num_computed_tokens)
            cached.num_output_tokens.append(req.num_output_tokens)
        for req in running_sched:
            cached.req_ids.append(req.request_id)
            nb = new_blocks.get(req.request_id)
            cached.new_block_ids.append((list(nb),) if nb else None)
            cached.num_computed_tokens.append(req.num_computed_tokens)
            cached.num_output_tokens.append(req.num_output_tokens)
        so = SchedulerOutput(
            scheduled_new_reqs=[NewRequestData(r.request_id, r.prompt_token_ids, self.kv.get_block_ids(r.request_id),
                                               r.num_computed_tokens, r.lora_request, r.mm_features) for r in new_reqs],
            scheduled_cached_reqs=cached, num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()), finished_req_ids=self.finished_req_ids,
            preempted_req_ids=preempted or None)
        self.finished_req_ids = set()
        so.kv_connector_metadata = self.connector.build_connector_meta(so)
        self.last_scheduled = {rid: self.requests[rid].num_computed_tokens for rid in num_scheduled}
        for rid, n in num_scheduled.items():  # _update_after_schedule
            self.requests[rid].num_computed_tokens += n
        return so

    def _aggregate(self, outputs: list[KVConnectorOutput]) -> KVConnectorOutput:
        agg = KVConnectorOutput(finished_sending=set(), finished_recving=set())
        for out in outputs:
            agg.invalid_block_ids |= set(out.invalid_block_ids or ())
            for kind in ("finished_sending", "finished_recving"):
                for rid in getattr(out, kind) or ():
                    self.reports[(kind, rid)] += 1
                    assert self.reports[(kind, rid)] <= self.world_size, f"{rid} reported {kind} twice by one rank"
                    if self.reports[(kind, rid)] == self.world_size:
                        getattr(agg, kind).add(rid)
        return agg

    def _handle_invalid_blocks(self, invalid: set[int], so: SchedulerOutput) -> set[str]:
        affected = set()
        for req in self.requests.values():
            blocks = self.kv.req_blocks.get(req.request_id, [])
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                scan = len(blocks) * self.kv.block_size if req.request_id not in self.failed_recving_kv_req_ids else req.num_computed_tokens
            elif req.request_id in so.num_scheduled_tokens:
                scan = self.last_scheduled.get(req.request_id, 0)
            else:
                continue
            nblocks = -(-scan // self.kv.block_size)
            for idx, b in enumerate(blocks[:nblocks]):
                if b in invalid:
                    self.kv.uncache(blocks[idx:nblocks])
                    req.num_computed_tokens = idx * self.kv.block_size
                    if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                        self.failed_recving_kv_req_ids.add(req.request_id)
                    else:
                        affected.add(req.request_id)
                        self.discarded_steps[req.request_id] += 1
                    break
        return affected

    def _free_request(self, req: Request) -> None:
        delay, _ = self.connector.request_finished(req, self.kv.get_block_ids(req.request_id)[0])
        self.finished_req_ids.add(req.request_id)
        if delay:
            self.delayed.add(req.request_id)
        else:
            self._free_blocks(req)

    def _free_blocks(self, req: Request) -> None:
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self.delayed.discard(req.request_id)

    def update_from_output(self, so: SchedulerOutput, outputs: list[KVConnectorOutput]) -> None:
        agg = self._aggregate(outputs)
        affected = self._handle_invalid_blocks(agg.invalid_block_ids, so) if agg.invalid_block_ids else set()
        self.last_affected = affected
        self.invalid_blocks_seen |= agg.invalid_block_ids
        for rid in so.num_scheduled_tokens:
            req = self.requests.get(rid)
            if req is None or rid in affected or req.is_finished():
                continue
            if req.num_computed_tokens >= req.num_tokens:
                req.append_output_token_ids(next_token(req.all_token_ids))
                if req.num_output_tokens >= req.max_tokens:
                    req.status = RequestStatus.FINISHED_STOPPED
                    self.running.remove(req)
                    self.finished.append(req)
                    self._free_request(req)
        self.connector.update_connector_output(agg)
        for rid in agg.finished_recving:
            req = self.requests[rid]
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self.finished_recving_kv_req_ids.add(rid)
            else:
                self._free_blocks(req)
        for rid in agg.finished_sending:
            assert rid in self.delayed, f"{rid} reported finished_sending but its blocks were not held"
            self._free_blocks(self.requests[rid])

    def abort(self, req_id: str) -> None:
        req = self.requests[req_id]
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        keep = req.status == RequestStatus.WAITING_FOR_REMOTE_KVS and req_id not in self.finished_recving_kv_req_ids
        req.status = RequestStatus.FINISHED_ABORTED
        delay, _ = self.connector.request_finished(req, self.kv.get_block_ids(req_id)[0])
        self.finished_req_ids.add(req_id)
        if delay or keep:
            self.delayed.add(req_id)
        else:
            self._free_blocks(req)


# ---- the model runner --------------------------------------------------------------------------------


class Worker:
    """One rank: its paged cache (FlashAttention NHD, one [2, blocks, block, heads, dim] array per
    layer, or one cross-layer [blocks, layers, 2, block, heads, dim] array), its connector, and a
    model that writes and checks KV."""

    def __init__(self, connector, requests: dict, rank: int, layers: int, heads: int, dim: int, num_blocks: int,
                 block_size: int, cross_layer: bool = False, device: str = "numpy"):
        self.connector, self.requests, self.rank = connector, requests, rank
        self.layers, self.heads, self.dim, self.block_size = layers, heads, dim, block_size
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        self.device = device
        if device == "numpy":
            zeros = lambda shape: np.zeros(shape, dtype=np.uint16)  # noqa: E731
        else:  # PyTorch tensors on a GPU: int16 holds the same 16-bit patterns
            import torch

            zeros = lambda shape: torch.zeros(shape, dtype=torch.int16, device=device)  # noqa: E731
        if cross_layer:
            self.cross = zeros((num_blocks, layers, 2, block_size, heads, dim))
            if device == "numpy":
                self.kv = [self.cross[:, i].transpose(1, 0, 2, 3, 4) for i in range(layers)]
            else:
                self.kv = [self.cross[:, i].permute(1, 0, 2, 3, 4) for i in range(layers)]
            connector.register_cross_layers_kv_cache(self.cross, None)
        else:
            self.kv = [zeros((2, num_blocks, block_size, heads, dim)) for _ in range(layers)]
            connector.register_kv_caches(dict(zip(self.names, self.kv)))
        self.blocks: dict[str, list[int]] = {}
        self.hashes: dict[str, np.ndarray] = {}
        self.step_mismatches: collections.Counter = collections.Counter()
        self.computed_tokens = 0

    def _dev(self, a: np.ndarray):
        if self.device == "numpy":
            return a
        import torch

        return torch.from_numpy(a.view(np.int16)).to(self.device)

    def _index(self, a: np.ndarray):
        if self.device == "numpy":
            return a
        import torch

        return torch.from_numpy(np.ascontiguousarray(a).astype(np.int64)).to(self.device)

    def _positions(self, req_id: str, first: int, count: int):
        blocks = self.blocks[req_id]
        pos = np.arange(first, first + count)
        return np.asarray(blocks)[pos // self.block_size], pos % self.block_size, pos

    def _hashes(self, req: Request, upto: int) -> np.ndarray:
        h = self.hashes.get(req.request_id)
        if h is None or len(h) < upto:
            h = prefix_hashes(req.all_token_ids)
            self.hashes[req.request_id] = h
        return h

    def execute_model(self, so: SchedulerOutput, before_forward: Callable[[], None] | None = None,
                      taint: dict | None = None):
        """A generator that runs one step, yielding after each layer so that the ranks of a
        tensor-parallel group advance layer by layer together; its value is the step's output.
        ``taint`` (shared by the ranks) records, per request, the first layer whose attention read
        a wrong byte on any rank: as the layers' outputs are all-reduced across ranks, every rank's
        KV written at later layers for that step's tokens is then wrong too (XOR 0x5A5A here)."""
        taint = {} if taint is None else taint
        c = self.connector
        if so.preempted_req_ids:
            c.handle_preemptions(so.preempted_req_ids)
        for rid in so.finished_req_ids:  # _update_states
            self.blocks.pop(rid, None)
            self.hashes.pop(rid, None)
        for new in so.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            nb = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self.blocks[rid] = list(nb[0])
            elif nb:
                self.blocks[rid].extend(nb[0])
        self.step_mismatches = collections.Counter()
        if before_forward is not None:
            before_forward()
        if so.total_num_scheduled_tokens == 0:  # kv_connector_no_forward
            c.bind_connector_metadata(so.kv_connector_metadata)
            c.start_load_kv(ForwardContext(attn_metadata=None))
            out = self._finish(so, wait_for_save=False)
            return out
        yield  # the forward pass starts on every rank after the metadata
        c.bind_connector_metadata(so.kv_connector_metadata)
        md = {name: object() for name in self.names}
        c.start_load_kv(ForwardContext(attn_metadata=md))
        starts = {rid: self.requests[rid].num_computed_tokens - n for rid, n in so.num_scheduled_tokens.items()}
        for layer, name in enumerate(self.names):
            for rid, n in so.num_scheduled_tokens.items():  # the cache-update op: this step's tokens
                req = self.requests[rid]
                first = starts[rid]
                b, s, pos = self._positions(rid, first, n)
                host = expected_kv(self._hashes(req, first + n)[pos], layer, self.rank, self.heads, self.dim)
                if taint.get(rid, layer) < layer:
                    host = host ^ np.uint16(0x5A5A)
                kv = self._dev(host)
                b, s = self._index(b), self._index(s)
                self.kv[layer][0][b, s] = kv[:, 0]
                self.kv[layer][1][b, s] = kv[:, 1]
            c.wait_for_layer_load(name)
            for rid in so.num_scheduled_tokens:  # attention reads every earlier token's KV
                req = self.requests[rid]
                first = starts[rid]
                if first == 0:
                    continue
                b, s, pos = self._positions(rid, 0, first)
                want = self._dev(expected_kv(self._hashes(req, first)[pos], layer, self.rank, self.heads, self.dim))
                b, s = self._index(b), self._index(s)
                k, v = self.kv[layer][0][b, s], self.kv[layer][1][b, s]
                bad = int((k != want[:, 0]).sum() + (v != want[:, 1]).sum())
                self.step_mismatches[rid] += bad
                if bad:
                    taint[rid] = min(taint.get(rid, layer), layer)
            c.save_kv_layer(name, self.kv[layer], md[name])
            yield
        self.computed_tokens += so.total_num_scheduled_tokens
        return self._finish(so, wait_for_save=True)

    def _finish(self, so: SchedulerOutput, wait_for_save: bool) -> KVConnectorOutput:
        c = self.connector
        try:
            if wait_for_save:
                c.wait_for_save()
            sending, recving = c.get_finished(so.finished_req_ids)
            invalid = c.get_block_ids_with_load_errors()
        finally:
            c.clear_connector_metadata()
        return KVConnectorOutput(finished_sending=sending, finished_recving=recving, invalid_block_ids=set(invalid))


# ---- putting it together --------------------------------------------------------------------------


@dataclass
class Replay:
    """A vLLM engine in miniature: one scheduler-side connector, ``tp`` worker-side ones."""

    extra: dict = field(default_factory=dict)
    tp: int = 1
    layers: int = 2
    heads: int = 2
    dim: int = 8
    block_size: int = 16
    num_blocks: int = 64
    token_budget: int = 4096
    threshold: int = 0
    prefix_caching: bool = True
    cross_layer: bool = False
    socket_dir: str | None = None
    device: str = "numpy"  # or a PyTorch CUDA device, e.g. "cuda:0"

    def __post_init__(self):
        from kvortex.vllm import KVConnectorRole, KVortexConnector

        # Lookups wait long enough to be answered within the call unless a test says otherwise,
        # so a test's steps do not depend on how busy the machine is.
        extra = {"capacity_bytes": 1 << 22, "chunk_tokens": 32, "lookup_wait_us": 2_000_000,
                 "lookup_timeout_ms": 10_000, **self.extra}
        if self.socket_dir is not None:
            extra.setdefault("socket_dir", self.socket_dir)
        self.ktc = KVTransferConfig(kv_connector_extra_config=extra)
        cfg = lambda rank: VllmConfig(self.ktc, ModelConfig(), CacheConfig(block_size=self.block_size),  # noqa: E731
                                      ParallelConfig(tensor_parallel_size=self.tp, rank=rank))
        kvc = KVCacheConfig(num_blocks=self.num_blocks)
        self.sched_conn = KVortexConnector(cfg(0), KVConnectorRole.SCHEDULER, kvc)
        self.kv = BlockManager(self.num_blocks, self.block_size, self.prefix_caching)
        self.scheduler = Scheduler(self.sched_conn, self.kv, self.tp, self.token_budget, self.threshold)
        self.workers = [Worker(KVortexConnector(cfg(r), KVConnectorRole.WORKER, kvc), self.scheduler.requests, r,
                               self.layers, self.heads, self.dim, self.num_blocks, self.block_size, self.cross_layer,
                               self.device)
                        for r in range(self.tp)]
        self.steps = 0
        self.bad_bytes: collections.Counter = collections.Counter()
        self.hooks: list[Callable[[SchedulerOutput], None]] = []

    def step(self, before_forward: Callable[[], None] | None = None) -> SchedulerOutput:
        so = self.scheduler.schedule()
        for hook in self.hooks:
            hook(so)
        taint: dict = {}
        runs = [w.execute_model(so, before_forward, taint) for w in self.workers]
        outs: list = [None] * len(runs)
        while any(o is None for o in outs):  # the ranks advance layer by layer together
            for i, run in enumerate(runs):
                if outs[i] is None:
                    try:
                        next(run)
                    except StopIteration as done:
                        outs[i] = done.value
        self.scheduler.update_from_output(so, outs)
        for w in self.workers:  # a step vLLM discards (its blocks failed to load) may read anything
            for rid, n in w.step_mismatches.items():
                if rid not in self.scheduler.last_affected:
                    self.bad_bytes[rid] += n
        self.steps += 1
        return so

    def run(self, requests: list[Request] = (), max_steps: int = 2000) -> None:
        for r in requests:
            self.scheduler.add_request(r)
        while self.scheduler.has_requests():
            self.step()
            assert self.steps < max_steps, "the replay did not finish"

    def mismatches(self, req_id: str) -> int:
        """Wrong KV bytes attention read for a request, outside steps vLLM discards (those whose
        blocks were reported as failed loads)."""
        return self.bad_bytes[req_id]

    def close(self) -> None:
        for w in self.workers:
            w.connector.shutdown()
        self.sched_conn.shutdown()
