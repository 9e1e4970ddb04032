"""KVortex behind vLLM's KV connector interface.

Start vLLM with::

    --kv-transfer-config '{"kv_connector": "KVortexConnector", "kv_connector_module_path": "kvortex.vllm",
                           "kv_role": "kv_both", "kv_connector_extra_config": {"capacity_bytes": "32GiB"}}'

Written against **vLLM v0.16.0** (the ``releases/v0.16.0`` branch head,
``2d5be1dd5ce2e44dfea53ea03ff61143da5137eb``), from these files of that release:
``vllm/distributed/kv_transfer/kv_connector/v1/base.py`` (the interface),
``vllm/distributed/kv_transfer/kv_connector/factory.py`` (how the class is loaded),
``vllm/config/kv_transfer.py`` (``KVTransferConfig``), ``vllm/v1/core/sched/scheduler.py`` (the
scheduler's calls: ``schedule``, ``_update_waiting_for_remote_kv``, ``update_from_output``,
``_update_from_kv_xfer_finished``, ``_handle_invalid_blocks``, ``_free_request``,
``_preempt_request``), ``vllm/v1/core/sched/output.py`` (``SchedulerOutput``, ``NewRequestData``,
``CachedRequestData``), ``vllm/v1/core/kv_cache_manager.py`` (``KVCacheBlocks``),
``vllm/v1/request.py`` (``Request``), ``vllm/v1/outputs.py`` (``KVConnectorOutput``),
``vllm/v1/worker/kv_connector_model_runner_mixin.py`` and ``vllm/v1/worker/gpu_model_runner.py``
(the worker's calls), ``vllm/model_executor/layers/attention/kv_transfer_utils.py`` (the per-layer
hooks), the FlashAttention, FlashInfer and MLA backends (cache shapes) and
``vllm/distributed/parallel_state.py`` (ranks). vLLM is not needed to import this module: without
it the connector derives from a stand-in with the base class's metadata methods.

How it works:

- **Worker** (one per tensor/pipeline-parallel rank): ``register_kv_caches`` (or
  ``register_cross_layers_kv_cache``) builds a KVortex engine over that rank's paged cache (its own
  host memory, plus the disk and Redis tiers the configuration names) and serves lookups on a Unix
  socket, from a C++ thread that never takes the GIL. Prompts are stored chunk by chunk as their
  prefill completes (``save_kv_layer`` copies each layer after its attention); the chunks stay
  unreadable until the scheduler commits them, once no rank reported a failed load in that step
  (KV computed over one is wrong on every rank), and are rolled back otherwise, or when the
  request is preempted or aborted first. Loads are layer-wise within the step
  (``start_load_kv`` starts every layer's copies, ``wait_for_layer_load`` waits for that layer only)
  or, with ``load_mode = "async"``, between steps (the request waits in
  ``WAITING_FOR_REMOTE_KVS`` while its chunks come up from a tier).
- **Scheduler**: ``get_num_new_matched_tokens`` asks every rank's socket at once and takes the
  minimum (a prefix every rank can serve), returning ``None`` while answers are pending and 0 once
  ``lookup_timeout_ms`` has passed. The hit ends on a block boundary below the prompt's last token,
  which vLLM always recomputes. ``request_finished`` keeps a request's blocks while its stores may
  still read them; the workers report it in ``finished_sending`` once they are done.
- **Keys**: KVortex's chained hashes over the token ids, in a namespace of the model, the cache
  dtype, the tensor-parallel rank and size (and the pipeline stage); each request's ``cache_salt``,
  LoRA adapter and multimodal inputs (their identifiers and placeholder positions) salt its keys,
  so none of them is ever served another's KV. Requests given as prompt embeddings are refused.
- **Load errors**: a chunk that cannot be loaded (evicted since the lookup, a tier that fails,
  a copy that fails) is reported through ``get_block_ids_with_load_errors``, and vLLM recomputes
  from there; a block is never served unloaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import kvortex

log = logging.getLogger("kvortex.vllm")

VLLM_RELEASE = "v0.16.0"

try:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )

    HAVE_VLLM = True
except ImportError:
    import enum

    HAVE_VLLM = False

    class KVConnectorRole(enum.Enum):  # type: ignore[no-redef]
        """Stand-in for vLLM's enum (same members and values)."""

        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's marker base class."""

    class KVConnectorBase_V1:  # type: ignore[no-redef]
        """Stand-in for vLLM's base class: the constructor and the metadata methods it defines."""

        def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
            if getattr(vllm_config, "kv_transfer_config", None) is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._connector_metadata = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self) -> KVConnectorRole:
            return self._role

        def bind_connector_metadata(self, connector_metadata: Any) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self) -> Any:
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None


# ---- configuration -------------------------------------------------------------------------------

#: Every key ``kv_connector_extra_config`` accepts, with its default.
OPTIONS: dict[str, Any] = {
    "capacity_bytes": "4GiB",   # host memory of each worker's engine (int or "8GiB")
    "chunk_tokens": 256,        # tokens per stored chunk; a multiple of vLLM's block size
    "disk": None,               # disk tier settings, e.g. {"directory": "/var/cache/kvortex", "capacity_bytes": "256GiB"}
    "redis": None,              # Redis tier settings, e.g. {"servers": "10.0.0.5:6379", "password": "..."}
    "tiering": None,            # tiering settings (write, promotion_timeout_ms, ...)
    "engine": None,             # any other KVortex engine setting (kvortex/deployment_config.hpp)
    "stack": "auto",            # "auto" (gpu for CUDA caches), "gpu" or "host"
    "layout": "auto",           # "auto", "flash_attn", "flashinfer" or "mla": the paged cache's shape
    "load_mode": "sync",        # "sync": layer-wise within the step; "async": between steps
    "cross_layer": False,       # ask vLLM for one cross-layer cache tensor (prefer_cross_layer_blocks)
    "socket_dir": None,         # where the workers' lookup sockets live (default $XDG_RUNTIME_DIR or the temp dir)
    "lookup_wait_us": 300,      # how long one get_num_new_matched_tokens call waits for the ranks' answers
    "lookup_timeout_ms": 50,    # after this a lookup counts as a miss
    "min_hit_tokens": 0,        # hits shorter than this (beyond vLLM's own prefix cache) are ignored
}
_SET_BY_CONNECTOR = ("geometry", "block_tokens", "ns", "chunk_tokens", "store_partial_chunks")


class ConfigError(ValueError):
    """``kv_connector_extra_config`` has an unknown key or a bad value."""


def parse_options(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Checks ``kv_connector_extra_config`` and fills in the defaults; raises ``ConfigError``
    naming an unknown key (and the closest known one) or a bad value."""
    extra = dict(extra or {})
    for key in extra:
        if key not in OPTIONS:
            close = difflib.get_close_matches(str(key), OPTIONS.keys(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"kv_connector_extra_config: unknown key '{key}'{hint}; known keys: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **extra}
    for key in ("stack", "layout", "load_mode"):
        allowed = {"stack": ("auto", "gpu", "host"), "layout": ("auto", "flash_attn", "flashinfer", "mla"),
                   "load_mode": ("sync", "async")}[key]
        if opts[key] not in allowed:
            raise ConfigError(f"kv_connector_extra_config: '{key}' is {opts[key]!r}, expected one of {', '.join(allowed)}")
    for key in ("chunk_tokens", "lookup_wait_us", "lookup_timeout_ms", "min_hit_tokens"):
        v = opts[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (key == "chunk_tokens" and v == 0):
            raise ConfigError(f"kv_connector_extra_config: '{key}' is {v!r}, expected a {'positive' if key == 'chunk_tokens' else 'non-negative'} integer")
    for key in ("cross_layer",):
        if not isinstance(opts[key], bool):
            raise ConfigError(f"kv_connector_extra_config: '{key}' is {opts[key]!r}, expected true or false")
    for key in ("disk", "redis", "tiering", "engine"):
        if opts[key] is not None and not isinstance(opts[key], Mapping):
            raise ConfigError(f"kv_connector_extra_config: '{key}' is {opts[key]!r}, expected a table of settings")
    for key in _SET_BY_CONNECTOR:
        if isinstance(opts["engine"], Mapping) and key in opts["engine"]:
            raise ConfigError(f"kv_connector_extra_config: engine.{key} is set by the connector from vLLM's cache")
    return opts


# ---- request identity -------------------------------------------------------------------------------


class Refused(Exception):
    """A request whose KV the connector must not serve or store (e.g. prompt embeddings)."""


def request_salt(request: Any) -> bytes:
    """The key salt of a request: its ``cache_salt``, LoRA adapter and multimodal inputs (their
    identifiers and placeholder positions), so requests that differ in any of them never share a
    key. Raises ``Refused`` for prompt embeddings and for multimodal inputs without an identifier."""
    if getattr(request, "prompt_token_ids", None) is None:
        raise Refused("the prompt is given as embeddings")
    parts: list = []
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(["cache_salt", str(salt)])
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(["lora", str(getattr(lora, "lora_name", "")), str(getattr(lora, "lora_path", ""))])
    for f in getattr(request, "mm_features", None) or ():
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        pos = getattr(f, "mm_position", None)
        if not ident or pos is None:
            raise Refused("a multimodal input has no identifier")
        parts.append(["mm", str(ident), int(pos.offset), int(pos.length)])
    return json.dumps(parts, separators=(",", ":")).encode() if parts else b""


def _tokens_array(tokens: Iterable[int]) -> array:
    return array("i", tokens)


# ---- metadata (pickled from the scheduler to every worker) -----------------------------------------


@dataclass
class LoadSpec:
    """Load the chunks of ``tokens`` into blocks ``block_ids[first_block:end_block]`` (the blocks
    before them hold vLLM's own prefix-cache hit; the ones after are computed by vLLM)."""

    req_id: str
    tokens: bytes          # int32 token ids, whole chunks covering end_block * block_size
    salt: bytes
    block_ids: list[int]
    first_block: int
    end_block: int
    is_async: bool


@dataclass
class StoreSpec:
    """Store the chunks of ``tokens`` (computed in step ``step``) from blocks ``block_ids``. The
    chunks stay unreadable until the scheduler commits the store: only it knows whether any rank
    reported a failed load in that step, which would make the KV computed over it wrong."""

    req_id: str
    step: int
    tokens: bytes
    salt: bytes
    block_ids: list[int]


@dataclass
class KVortexConnectorMetadata(KVConnectorMetadata):
    step: int = 0
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    commits: list[tuple[int, str]] = field(default_factory=list)  # (step, request): make readable
    drops: list[tuple[int, str]] = field(default_factory=list)    # (step, request): roll back
    delayed_free: list[str] = field(default_factory=list)  # requests whose blocks the scheduler holds for our stores


# ---- ranks and sockets ------------------------------------------------------------------------------


def _ranks(vllm_config: Any) -> tuple[int, int, int, int]:
    """(tp_rank, tp_size, pp_rank, pp_size) of this process: from vLLM's process groups when they
    exist, else from ``parallel_config.rank`` (tensor-parallel ranks vary fastest, as in vLLM)."""
    pc = getattr(vllm_config, "parallel_config", None)
    tp_size = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    pp_size = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    try:  # pragma: no cover - needs vLLM's initialised process groups
        from vllm.distributed.parallel_state import (  # type: ignore
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
                get_pp_group().rank_in_group, get_pp_group().world_size)
    except Exception:
        rank = int(getattr(pc, "rank", 0) or 0)
        return rank % tp_size, tp_size, rank // tp_size, pp_size


def socket_path(socket_dir: str | None, engine_id: str, dp_rank: int, pp_rank: int, tp_rank: int) -> str:
    """Where the worker of (dp, pp, tp) serves lookups; the engine id is hashed to keep the path
    within a Unix socket address's 107 bytes."""
    base = socket_dir or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    tag = hashlib.sha256(str(engine_id).encode()).hexdigest()[:16]
    return os.path.join(base, f"kvortex-{tag}-dp{dp_rank}-pp{pp_rank}-tp{tp_rank}.sock")


def _layer_index(name: str, fallback: int) -> int:
    m = re.search(r"layers\.(\d+)\.", name) or re.search(r"(\d+)", name)
    return int(m.group(1)) if m else fallback


# ---- the connector ------------------------------------------------------------------------------------


@dataclass
class _Request:
    tokens: array                  # prompt token ids
    salt: bytes
    block_ids: list[int] = field(default_factory=list)
    local_tokens: int = 0          # vLLM's own prefix-cache hit, as passed to get_num_new_matched_tokens
    load_end: int = 0              # end of the KVortex hit this request was promised
    stored_upto: int = 0           # tokens whose store has been issued
    pending: dict = field(default_factory=dict)  # step -> blocks of a store not yet committed or dropped
    stores_issued: bool = False    # a store was committed: the worker may still be copying
    load_failed: bool = False      # a load into its blocks failed: no more external hits for it


@dataclass
class _Lookup:
    query: int
    sent: float


class KVortexConnector(KVConnectorBase_V1):
    """vLLM KV connector over KVortex (see the module's documentation)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self._opts = parse_options(getattr(ktc, "kv_connector_extra_config", None))
        self._block_size = int(vllm_config.cache_config.block_size)
        self._chunk = int(self._opts["chunk_tokens"])
        if self._chunk % self._block_size:
            raise ConfigError(f"kv_connector_extra_config: chunk_tokens {self._chunk} is not a multiple of vLLM's "
                              f"block size {self._block_size}")
        pc = getattr(vllm_config, "parallel_config", None)
        for cp in ("decode_context_parallel_size", "prefill_context_parallel_size"):
            if int(getattr(pc, cp, 1) or 1) > 1:
                raise ConfigError(f"KVortexConnector: {cp} > 1 is not supported (it scales the scheduler's block size)")
        self._dp_rank = int(getattr(pc, "data_parallel_rank", 0) or 0)
        self._engine_id = str(getattr(ktc, "engine_id", None) or "kvortex")
        self._tp_rank, self._tp_size, self._pp_rank, self._pp_size = _ranks(vllm_config)
        # scheduler side
        self._client: kvortex.LookupClient | None = None
        self._lookups: dict[str, _Lookup] = {}
        self._hits: dict[str, int] = {}
        self._reqs: dict[str, _Request] = {}
        self._to_load: dict[str, LoadSpec] = {}
        self._delayed: list[str] = []
        self._refused: set[str] = set()
        self._async_loading: set[str] = set()
        self._step = 0
        # A step's outcome (its failed loads) is known this many schedule() calls later: one, plus
        # one with asynchronous scheduling, plus the pipeline stages in flight.
        self._depth = 2 + max(0, self._pp_size - 1)
        self._invalid: list[tuple[int, set[int]]] = []  # (step seen, blocks that failed to load)
        self._commits: list[tuple[int, str]] = []
        self._drops: list[tuple[int, str]] = []
        self.lookup_timeouts = 0
        # worker side
        self._engine: kvortex.Engine | None = None
        self._layout: kvortex.Layout | None = None
        self._layer_of: dict[str, int] = {}
        self._num_layers = 0
        self._device = False
        self._loads: list[tuple[LoadSpec, Any, Any]] = []   # (spec, layered transfer or ticket, expected end)
        self._load_events: list[Any] = []
        self._loads_waited = True
        self._async_loads: dict[str, list] = {}
        self._step_stores: list = []       # stores opened in this step
        self._step_opened = False
        self._open: dict[tuple[int, str], tuple] = {}
        self._inflight: dict[str, list] = {}  # request -> [(ticket, events)] of committed stores
        self._load_event, self._load_event_keep = 0, []
        self._delayed_seen: set[str] = set()
        self._finished_seen: set[str] = set()
        self._load_errors: set[int] = set()
        self._failed_now: set[int] = set()  # blocks whose load failed in this step: never stored from
        self._side_stream: Any = None
        self.stats = {"loads": 0, "loaded_tokens": 0, "load_failures": 0, "stores": 0, "store_failures": 0,
                      "refused": 0}

    # ---- scheduler side ----------------------------------------------------------------------------

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        return bool(self._opts["cross_layer"])

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        return None  # NHD and HND are both read from the tensors' strides

    def _lookup_client(self) -> kvortex.LookupClient:
        if self._client is None:
            paths = [socket_path(self._opts["socket_dir"], self._engine_id, self._dp_rank, pp, tp)
                     for pp in range(self._pp_size) for tp in range(self._tp_size)]
            self._client = kvortex.LookupClient(paths)
        return self._client

    def _request(self, request: Any) -> _Request | None:
        rs = self._reqs.get(request.request_id)
        if rs is None and request.request_id not in self._refused:
            try:
                salt = request_salt(request)
            except Refused as e:
                self.stats["refused"] += 1
                self._refused.add(request.request_id)
                log.info("kvortex: request %s is not cached: %s", request.request_id, e)
                return None
            rs = _Request(_tokens_array(request.prompt_token_ids), salt)
            self._reqs[request.request_id] = rs
        return rs

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        rs = self._request(request)
        if rs is None or rs.load_failed or getattr(request, "skip_reading_prefix_cache", False):
            return 0, False  # (prompt logprobs need every position computed)
        total = int(request.num_tokens)
        limit = (total - 1) // self._block_size * self._block_size  # the last token is always computed
        if limit < self._chunk or limit <= num_computed_tokens:
            return 0, False
        hit = self._hit(request.request_id, request.all_token_ids, limit, rs.salt)
        if hit is None:
            return None, False
        end = min(hit, limit) // self._block_size * self._block_size
        ext = end - num_computed_tokens
        if ext <= 0 or ext < self._opts["min_hit_tokens"]:
            return 0, False
        rs.local_tokens = num_computed_tokens
        rs.load_end = end
        return ext, self._opts["load_mode"] == "async"

    def _hit(self, req_id: str, tokens: Any, limit: int, salt: bytes) -> int | None:
        if req_id in self._hits:
            return self._hits[req_id]
        client = self._lookup_client()
        pending = self._lookups.get(req_id)
        if pending is None:
            pending = _Lookup(client.send(_tokens_array(tokens[:limit]), salt), time.monotonic())
            self._lookups[req_id] = pending
        got = client.poll(pending.query, float(self._opts["lookup_wait_us"]))
        if got is None:
            if (time.monotonic() - pending.sent) * 1000.0 < self._opts["lookup_timeout_ms"]:
                return None
            client.cancel(pending.query)
            self.lookup_timeouts += 1
            got = 0
        del self._lookups[req_id]
        self._hits[req_id] = int(got)
        return int(got)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        rs = self._reqs.get(request.request_id) or self._request(request)
        self._hits.pop(request.request_id, None)
        if rs is None:
            return
        rs.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0:
            return
        end = rs.local_tokens + int(num_external_tokens)
        chunks_end = -(-end // self._chunk) * self._chunk
        self._to_load[request.request_id] = LoadSpec(
            req_id=request.request_id, tokens=rs.tokens[:chunks_end].tobytes() if chunks_end <= len(rs.tokens)
            else _tokens_array(list(request.all_token_ids)[:chunks_end]).tobytes(),
            salt=rs.salt, block_ids=rs.block_ids[: end // self._block_size], first_block=rs.local_tokens // self._block_size,
            end_block=end // self._block_size, is_async=self._opts["load_mode"] == "async")

    def build_connector_meta(self, scheduler_output: Any) -> KVortexConnectorMetadata:
        self._step += 1
        meta = KVortexConnectorMetadata(step=self._step)
        self._hits.clear()  # a hit counts for the step it was found in only
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            rs = self._reqs.get(req_id)
            if rs is not None:  # its blocks are free now: the worker rolls its open stores back
                for step in list(rs.pending):
                    self._drops.append((step, req_id))
                rs.pending.clear()
                rs.stored_upto = 0  # stored again once recomputed (present chunks are skipped)
                rs.stores_issued = False  # handle_preemptions waited for the committed ones
        self._resolve()
        for new in scheduler_output.scheduled_new_reqs:
            rs = self._reqs.get(new.req_id)
            if rs is not None:
                rs.block_ids = list(new.block_ids[0])
                self._add_store(meta, new.req_id, rs, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        for i, req_id in enumerate(cached.req_ids):
            rs = self._reqs.get(req_id)
            if rs is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                rs.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                rs.block_ids.extend(new_ids[0])
            self._add_store(meta, req_id, rs, cached.num_computed_tokens[i], scheduler_output)
        meta.loads = list(self._to_load.values())
        self._async_loading.update(spec.req_id for spec in meta.loads if spec.is_async)
        self._to_load.clear()
        meta.commits, self._commits = self._commits, []
        meta.drops, self._drops = self._drops, []
        meta.delayed_free, self._delayed = self._delayed, []
        return meta

    def _resolve(self) -> None:
        """Commits the stores of steps whose outcome is known, unless a block they read failed to
        load since (then they are dropped and stored again after vLLM recomputes)."""
        known = self._step - self._depth
        self._invalid = [(st, b) for st, b in self._invalid if st > known - self._depth]
        for req_id, rs in self._reqs.items():
            for step in [st for st in rs.pending if st <= known]:
                blocks = rs.pending.pop(step)
                if any(seen >= step and blocks & bad for seen, bad in self._invalid):
                    self._drops.append((step, req_id))
                    rs.stored_upto = 0
                else:
                    self._commits.append((step, req_id))
                    rs.stores_issued = True

    def _add_store(self, meta: KVortexConnectorMetadata, req_id: str, rs: _Request, computed: int, so: Any) -> None:
        done = int(computed) + int(so.num_scheduled_tokens.get(req_id, 0))
        upto = min(done, len(rs.tokens)) // self._chunk * self._chunk
        if upto <= rs.stored_upto:
            return
        nblocks = upto // self._block_size
        if len(rs.block_ids) < nblocks:
            return  # not all of its blocks are known here (cannot happen for a scheduled request)
        meta.stores.append(StoreSpec(req_id, self._step, rs.tokens[:upto].tobytes(), rs.salt, rs.block_ids[:nblocks]))
        rs.stored_upto = upto
        rs.pending[self._step] = set(rs.block_ids[:nblocks])

    def update_connector_output(self, connector_output: Any) -> None:
        # Blocks that failed to load are recomputed by vLLM: their chunks must be stored again.
        self._async_loading.difference_update(getattr(connector_output, "finished_recving", None) or ())
        invalid = set(getattr(connector_output, "invalid_block_ids", None) or ())
        if not invalid:
            return
        self._invalid.append((self._step, invalid))
        for rs in self._reqs.values():
            for i, b in enumerate(rs.block_ids):
                if b in invalid:
                    rs.stored_upto = min(rs.stored_upto, i * self._block_size // self._chunk * self._chunk)
                    rs.load_failed = True  # asking again would find the same unloadable chunks
                    break

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        rs = self._reqs.pop(req_id, None)
        self._refused.discard(req_id)
        self._hits.pop(req_id, None)
        self._to_load.pop(req_id, None)
        pending = self._lookups.pop(req_id, None)
        if pending is not None and self._client is not None:
            self._client.cancel(pending.query)
        if rs is None:
            return False, None
        # A request that finished normally got its token from every step it ran: none of its
        # open stores read a failed load, so they are committed. An aborted one may have a step
        # in flight: its open stores are dropped.
        aborted = "ABORT" in str(getattr(getattr(request, "status", None), "name", getattr(request, "status", "")))
        for step in list(rs.pending):
            (self._drops if aborted else self._commits).append((step, req_id))
            if not aborted:
                rs.stores_issued = True
        holds = bool(rs.pending) or rs.stores_issued
        rs.pending.clear()
        # Aborted while its asynchronous load runs: vLLM holds the blocks until finished_recving.
        waiting_for_load = req_id in self._async_loading
        self._async_loading.discard(req_id)
        if holds and not waiting_for_load:
            # The worker reports it in finished_sending once its stores are done (or dropped).
            self._delayed.append(req_id)
            return True, None
        return False, None

    def take_events(self) -> Iterable[Any]:
        return ()

    # ---- worker side -----------------------------------------------------------------------------

    def _engine_settings(self, geometry: dict, block_tokens: int) -> dict:
        vc = self._vllm_config
        mc = getattr(vc, "model_config", None)
        cache_dtype = str(getattr(vc.cache_config, "cache_dtype", "auto"))
        dtype = str(getattr(mc, "dtype", "")) if cache_dtype == "auto" else cache_dtype
        settings: dict = {
            "capacity_bytes": self._opts["capacity_bytes"],
            "chunk_tokens": self._chunk,
            "block_tokens": block_tokens,
            "geometry": geometry,
            "ns": {"model_id": "|".join(str(x) for x in (getattr(mc, "model", "") or "unknown", getattr(mc, "revision", None) or "",
                                                           getattr(mc, "quantization", None) or "") ),
                   "dtype": dtype.replace("torch.", ""),
                   "tp_rank": self._tp_rank, "tp_size": self._tp_size},
        }
        if self._pp_size > 1:
            settings["ns"]["cache_salt"] = f"pp{self._pp_rank}/{self._pp_size}"
        for section in ("disk", "redis", "tiering"):
            if self._opts[section]:
                settings[section] = dict(self._opts[section])
        if self._opts["engine"]:
            settings.update(dict(self._opts["engine"]))
        return settings

    def _ordered_layers(self, kv_caches: Mapping[str, Any]) -> list[tuple[str, Any]]:
        items = list(kv_caches.items())
        return sorted(items, key=lambda kv: (_layer_index(kv[0], items.index(kv)), items.index(kv)))

    def _start_engine(self, layout: kvortex.Layout, device: bool) -> None:
        stack = self._opts["stack"]
        if stack == "auto":
            stack = "gpu" if device else "host"
        if layout.block_tokens != self._block_size:
            raise ConfigError(f"KVortexConnector: the cache's blocks hold {layout.block_tokens} tokens but vLLM's "
                              f"block size is {self._block_size} (kernel block sizes other than the scheduler's are not supported)")
        self._engine = kvortex.Engine(self._engine_settings(self._geometry, layout.block_tokens), stack=stack)
        self._layout = layout
        self._device = device
        self._num_layers = layout.num_layers
        path = socket_path(self._opts["socket_dir"], self._engine_id, self._dp_rank, self._pp_rank, self._tp_rank)
        self._engine.serve_lookups(path)
        self.socket = path
        if device:
            import torch  # only a CUDA cache gets here

            self._side_stream = torch.cuda.Stream()

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if not kv_caches:
            raise ConfigError("register_kv_caches: no KV cache tensors")
        ordered = self._ordered_layers(kv_caches)
        unique: list[Any] = []
        index_of_ptr: dict[int, int] = {}
        for name, t in ordered:
            info = kvortex._array_info(t, f"register_kv_caches: {name}")
            if info.ptr not in index_of_ptr:  # layers that share a KV tensor are one layer here
                index_of_ptr[info.ptr] = len(unique)
                unique.append(t)
            self._layer_of[name] = index_of_ptr[info.ptr]
        first = kvortex._array_info(unique[0], "register_kv_caches")
        kind = self._opts["layout"]
        if kind == "auto":
            num_blocks = getattr(self._kv_cache_config, "num_blocks", None)
            if len(first.shape) == 3:
                kind = "mla"
            elif len(first.shape) == 5 and first.shape[0] == 2 and (first.shape[1] != 2 or num_blocks == 2):
                kind = "flash_attn"
            elif len(first.shape) == 5 and first.shape[1] == 2:
                kind = "flashinfer"
            else:
                raise ConfigError(f"register_kv_caches: cannot tell the cache layout from shape {list(first.shape)}; "
                                  "set kv_connector_extra_config.layout")
        layout = {"flash_attn": kvortex.flash_attn_layout, "flashinfer": kvortex.flashinfer_layout,
                  "mla": kvortex.mla_layout}[kind](unique)
        if kind == "mla":
            self._geometry = {"num_layers": len(unique), "kv_planes": 1, "kv_heads": 1, "head_dim": first.shape[2],
                              "element_bytes": first.itemsize}
        else:
            heads, dim = first.shape[3], first.shape[4]
            self._geometry = {"num_layers": len(unique), "kv_planes": 2, "kv_heads": heads, "head_dim": dim,
                              "element_bytes": first.itemsize}
        self._start_engine(layout, first.device)

    def register_cross_layers_kv_cache(self, kv_cache: Any, attn_backend: Any = None) -> None:
        info = kvortex._array_info(kv_cache, "register_cross_layers_kv_cache")
        if len(info.shape) != 6:
            raise ConfigError(f"register_cross_layers_kv_cache: shape {list(info.shape)}: only the "
                              "[num_blocks, num_layers, 2, block_size, kv_heads, head_size] (NHD) tensor is supported; "
                              "leave cross_layer off for this backend")
        order = None
        if attn_backend is not None and hasattr(attn_backend, "get_kv_cache_stride_order"):
            try:
                order = tuple(attn_backend.get_kv_cache_stride_order(include_num_layers_dimension=True))
            except TypeError:
                order = None
        # The [blocks, layers, 2, block, heads, dim] tensors: FlashAttention and FlashInfer in NHD.
        if (order is not None and order not in ((2, 0, 1, 3, 4, 5), (1, 0, 2, 3, 4, 5))) or info.shape[2] != 2 \
                or info.shape[3] != self._block_size:
            raise ConfigError(f"register_cross_layers_kv_cache: shape {list(info.shape)} (stride order {order}) is not "
                              "[num_blocks, num_layers, 2, block_size, kv_heads, head_size]; leave cross_layer off "
                              "for this backend or layout (HND, MLA)")
        layout = kvortex.cross_layer_layout(kv_cache, blocks_outermost=True)
        nb, layers, planes, bt, heads, dim = info.shape
        self._geometry = {"num_layers": layers, "kv_planes": planes, "kv_heads": heads, "head_dim": dim,
                          "element_bytes": info.itemsize}
        self._cross_layer = True
        self._start_engine(layout, info.device)

    def _layer(self, layer_name: str) -> int | None:
        idx = self._layer_of.get(layer_name)
        if idx is None and getattr(self, "_cross_layer", False):
            idx = _layer_index(layer_name, -1)
            if 0 <= idx < self._num_layers:
                self._layer_of[layer_name] = idx
            else:
                idx = None
        return idx

    def _table(self, spec: LoadSpec, tokens: int) -> list[int]:
        blocks = -(-tokens // self._block_size)
        table = [-1] * blocks  # -1: a block this load does not write
        for b in range(spec.first_block, min(spec.end_block, blocks)):
            table[b] = spec.block_ids[b]
        return table

    def _fail_blocks(self, spec: LoadSpec, from_token: int) -> None:
        first = max(spec.first_block, from_token // self._block_size)
        bad = spec.block_ids[first:spec.end_block]
        if bad:
            self._load_errors.update(bad)
            self._failed_now.update(bad)
            self.stats["load_failures"] += 1

    # Stores: opened in save_kv_layer (each layer copied after its attention), held open (written,
    # unreadable) until the scheduler's metadata commits or drops them, then finished in the
    # background. Entries of _open: (step, request) -> (spec, layered transfer, tokens it covers,
    # events its copies wait on).

    def _drop_open(self, key: tuple[int, str]) -> None:
        entry = self._open.pop(key, None)
        if entry is not None:
            del entry  # a dropped transfer rolls back, after the copies already submitted

    def _commit_open(self, key: tuple[int, str]) -> None:
        entry = self._open.pop(key, None)
        if entry is None:
            return
        spec, lt, _covered, events = entry
        try:
            self._inflight.setdefault(spec.req_id, []).append((lt.finish(), events))
            self.stats["stores"] += 1
        except kvortex.Error as e:
            self.stats["store_failures"] += 1
            log.warning("kvortex: store of %s failed: %s", spec.req_id, e)

    def _current_event(self) -> tuple[int, list]:
        """An event on the current CUDA stream (0 and no event on the host stack)."""
        if not self._device:
            return 0, []
        import torch

        ev = torch.cuda.Event()
        ev.record()
        return ev.cuda_event, [ev]

    def handle_preemptions(self, preempted_req_ids: set[str]) -> None:
        # Runs before the step's forward pass and before its metadata: the preempted requests'
        # blocks are already free, so no copy may read them once this returns.
        preempted = set(preempted_req_ids or ())
        for key in [k for k in self._open if k[1] in preempted]:
            self._drop_open(key)  # the scheduler drops these too
        for req_id in preempted:
            for ticket, _events in self._inflight.pop(req_id, []):
                self._wait_store(ticket)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        self._delayed_seen.update(meta.delayed_free)
        if self._engine is None:
            return
        for key in meta.drops:
            self._drop_open(tuple(key))
        for key in meta.commits:
            self._commit_open(tuple(key))
        self._loads = []
        self._failed_now = set()
        # Copies into blocks start after the work already queued on the compute stream (with
        # asynchronous scheduling, a step that still writes blocks vLLM has handed on).
        self._load_event, self._load_event_keep = self._current_event()
        for spec in meta.loads:
            if spec.is_async:
                self._start_async_load(spec)
            else:
                self._start_sync_load(spec)
        self._loads_waited = not self._loads
        mode = getattr(forward_context, "cudagraph_runtime_mode", None)
        if self._device and self._load_events and "FULL" == getattr(mode, "name", str(mode)):
            # A replayed full CUDA graph runs no per-layer hook: wait for every layer now.
            import torch

            stream = torch.cuda.current_stream()
            for events in self._load_events:
                stream.wait_event(events[-1])
            self._loads_waited = True

    def _start_sync_load(self, spec: LoadSpec) -> None:
        tokens = array("i")
        tokens.frombytes(spec.tokens)
        end = spec.end_block * self._block_size
        try:
            lt = self._engine.begin_retrieve(tokens, self._layout, self._table(spec, len(tokens)), salt=spec.salt)
        except kvortex.Error as e:
            log.warning("kvortex: load of %s failed: %s", spec.req_id, e)
            self._fail_blocks(spec, 0)
            return
        if lt.tokens < end:
            self._fail_blocks(spec, lt.tokens)  # evicted (or lost below) since the lookup
        self.stats["loads"] += 1
        self.stats["loaded_tokens"] += max(0, min(lt.tokens, end) - spec.first_block * self._block_size)
        try:
            if self._device and self._side_stream is not None:
                import torch

                events = []
                for layer in range(self._num_layers):
                    lt.submit_layer(layer, stream=self._side_stream.cuda_stream, event=self._load_event)
                    ev = torch.cuda.Event()
                    ev.record(self._side_stream)
                    events.append(ev)
                self._load_events.append(events)
            else:
                lt.submit_all()
            self._loads.append((spec, lt.finish(), end))
        except kvortex.Error as e:
            log.warning("kvortex: load of %s failed: %s", spec.req_id, e)
            self._fail_blocks(spec, 0)

    def _start_async_load(self, spec: LoadSpec) -> None:
        tokens = array("i")
        tokens.frombytes(spec.tokens)
        try:
            ticket = self._engine.prefetch(tokens, salt=spec.salt)  # brings the chunks up on a tier thread
        except kvortex.Error as e:
            log.warning("kvortex: load of %s failed: %s", spec.req_id, e)
            ticket = None
        self._async_loads[spec.req_id] = [spec, tokens, ticket, None]

    def _progress_async_loads(self) -> set[str]:
        done: set[str] = set()
        for req_id, entry in list(self._async_loads.items()):
            spec, tokens, prefetch, copy = entry
            end = spec.end_block * self._block_size
            if copy is None:
                if prefetch is not None and not prefetch.ready():
                    continue
                try:
                    if prefetch is not None:
                        prefetch.wait()
                    event, keep = self._current_event()
                    lt = self._engine.begin_retrieve(tokens, self._layout, self._table(spec, len(tokens)), salt=spec.salt)
                    lt.submit_all(event=event)
                    copy = (lt.finish(), lt.tokens, keep)
                except kvortex.Error as e:
                    log.warning("kvortex: load of %s failed: %s", spec.req_id, e)
                    self._fail_blocks(spec, 0)
                    done.add(req_id)
                    del self._async_loads[req_id]
                    continue
                entry[3] = copy
            ticket, pinned, _keep = copy
            if not ticket.ready():
                continue
            try:
                got = min(ticket.wait(), pinned)
                if got < end:
                    self._fail_blocks(spec, got)
                self.stats["loads"] += 1
                self.stats["loaded_tokens"] += max(0, min(got, end) - spec.first_block * self._block_size)
            except kvortex.Error as e:
                log.warning("kvortex: load of %s failed: %s", spec.req_id, e)
                self._fail_blocks(spec, 0)
            done.add(req_id)
            del self._async_loads[req_id]
        return done

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._loads_waited:
            return
        idx = self._layer(layer_name)
        if self._device and self._load_events and idx is not None:
            import torch

            stream = torch.cuda.current_stream()
            for events in self._load_events:
                stream.wait_event(events[idx])
            return
        self._finish_loads()

    def _finish_loads(self) -> None:
        for spec, ticket, end in self._loads:
            try:
                got = ticket.wait()
                if got < end:
                    self._fail_blocks(spec, got)
            except kvortex.Error as e:
                log.warning("kvortex: load of %s failed: %s", spec.req_id, e)
                self._fail_blocks(spec, 0)
        self._loads = []
        self._load_events = []
        self._loads_waited = True

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        if self._engine is None:
            return
        meta = self._get_connector_metadata()
        if not meta.stores:
            return
        idx = self._layer(layer_name)
        if idx is None:
            return
        if not self._step_stores and not self._step_opened:
            self._step_opened = True
            for spec in meta.stores:
                opened = self._begin_store(spec)
                if opened is not None:
                    self._step_stores.append(opened)
        if not self._step_stores:
            return
        event, keep = self._current_event()  # this layer's attention has written its KV
        for spec, lt, covered, events, sent in self._step_stores:
            if idx in sent:
                continue
            try:
                lt.submit_layer(idx, event=event)
                sent.add(idx)
                events.extend(keep)
            except kvortex.Error as e:
                log.warning("kvortex: store of %s failed: %s", spec.req_id, e)

    def _clean_prefix(self, spec: StoreSpec) -> int:
        """Tokens of the spec before its first block whose load failed (whole chunks)."""
        n = len(spec.tokens) // 4
        for i, b in enumerate(spec.block_ids):
            if b in self._failed_now:
                return min(n, i * self._block_size // self._chunk * self._chunk)
        return n

    def _begin_store(self, spec: StoreSpec):
        tokens = array("i")
        tokens.frombytes(spec.tokens)
        clean = self._clean_prefix(spec)
        if clean < len(tokens):  # a block that failed to load holds no KV worth keeping
            del tokens[clean:]
            if not tokens:
                return None
        try:
            lt = self._engine.begin_store(tokens, self._layout, spec.block_ids, salt=spec.salt)
        except kvortex.Error as e:
            self.stats["store_failures"] += 1
            log.warning("kvortex: store of %s failed: %s", spec.req_id, e)
            return None
        return (spec, lt, len(tokens), [], set())

    def wait_for_save(self) -> None:
        if self._engine is None or not self.has_connector_metadata():
            return
        if not self._loads_waited:
            self._finish_loads()  # load errors are reported in this pass
        meta = self._get_connector_metadata()
        if meta.stores and not self._step_opened:
            # No per-layer hook ran this step (a replayed CUDA graph, a model without attention
            # hooks): store whole chunks now that the forward pass is queued.
            for spec in meta.stores:
                opened = self._begin_store(spec)
                if opened is not None:
                    self._step_stores.append(opened)
        event, keep = self._current_event()
        for spec, lt, covered, events, sent in self._step_stores:
            if self._clean_prefix(spec) < covered:
                # A load into these blocks failed after the store began: roll it back.
                self.stats["store_failures"] += 1
                continue
            try:
                for layer in range(self._num_layers):
                    if layer not in sent:
                        lt.submit_layer(layer, event=event)
                events.extend(keep)
                self._open[(spec.step, spec.req_id)] = (spec, lt, covered, events)
            except kvortex.Error as e:
                self.stats["store_failures"] += 1
                log.warning("kvortex: store of %s failed: %s", spec.req_id, e)
        self._step_stores = []
        self._step_opened = False

    def _wait_store(self, ticket: Any) -> None:
        try:
            ticket.wait()
        except kvortex.Error as e:
            self.stats["store_failures"] += 1
            log.warning("kvortex: a store failed: %s", e)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._finished_seen.update(finished_req_ids or ())
        for req_id, tickets in list(self._inflight.items()):  # let go of what is done
            left = [(t, ev) for t, ev in tickets if not t.ready()]
            for t, _ev in tickets:
                if t.ready():
                    self._wait_store(t)
            if left:
                self._inflight[req_id] = left
            else:
                del self._inflight[req_id]
        sending: set[str] = set()
        open_reqs = {k[1] for k in self._open}
        for req_id in list(self._delayed_seen & self._finished_seen):
            if req_id in open_reqs:
                continue  # its last stores are not committed yet
            for ticket, _events in self._inflight.pop(req_id, []):
                self._wait_store(ticket)  # copies out of its blocks, submitted a step ago or more
            self._delayed_seen.discard(req_id)
            sending.add(req_id)
        self._finished_seen -= sending
        self._finished_seen = {r for r in self._finished_seen if r in self._delayed_seen or r in open_reqs}
        recving = self._progress_async_loads() if self._async_loads else set()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self) -> None:
        self._open.clear()  # uncommitted: rolled back
        self._step_stores = []
        for tickets in self._inflight.values():
            for t, _ev in tickets:
                self._wait_store(t)
        self._inflight.clear()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        self._client = None

    def engine(self) -> kvortex.Engine | None:
        """This worker's KVortex engine (None on the scheduler side or before registration)."""
        return self._engine
