"""vLLM-shaped objects (vLLM v0.16.0), with the fields the connector reads.

Each class mirrors the one named in its docstring: the same attribute names and meanings, nothing
else. They are plain Python so the replay runs where vLLM cannot be installed.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class KVTransferConfig:
    """vllm/config/kv_transfer.py: KVTransferConfig."""

    kv_connector: str = "KVortexConnector"
    kv_role: str = "kv_both"
    kv_connector_module_path: str = "kvortex.vllm"
    kv_connector_extra_config: dict = field(default_factory=dict)
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    kv_load_failure_policy: str = "recompute"

    def get_from_extra_config(self, key: str, default: Any) -> Any:
        return self.kv_connector_extra_config.get(key, default)


@dataclass
class ModelConfig:
    """vllm/config/model.py: ModelConfig (model and dtype only)."""

    model: str = "replay/llama-shaped"
    dtype: str = "torch.bfloat16"


@dataclass
class CacheConfig:
    """vllm/config/cache.py: CacheConfig (block_size, cache_dtype)."""

    block_size: int = 16
    cache_dtype: str = "auto"


@dataclass
class ParallelConfig:
    """vllm/config/parallel.py: ParallelConfig (sizes and this worker's global rank)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_rank: int = 0
    rank: int = 0


@dataclass
class VllmConfig:
    """vllm/config/vllm.py: VllmConfig (the parts a connector reads)."""

    kv_transfer_config: KVTransferConfig
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class KVCacheConfig:
    """vllm/v1/kv_cache_interface.py: KVCacheConfig (num_blocks only)."""

    num_blocks: int


class RequestStatus(enum.IntEnum):
    """vllm/v1/request.py: RequestStatus (finished states compare above PREEMPTED)."""

    WAITING = 0
    WAITING_FOR_REMOTE_KVS = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_ABORTED = 5


@dataclass
class LoRARequest:
    """vllm/lora/request.py: LoRARequest."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass
class PlaceholderRange:
    """vllm/multimodal/inputs.py: PlaceholderRange."""

    offset: int
    length: int


@dataclass
class MultiModalFeatureSpec:
    """vllm/multimodal/inputs.py: MultiModalFeatureSpec (identifier and position)."""

    identifier: str
    mm_position: PlaceholderRange
    modality: str = "image"


class Request:
    """vllm/v1/request.py: Request. ``max_tokens`` output tokens are generated, one per step; the
    output token of a step is a function of the tokens before it, so reruns agree."""

    def __init__(self, request_id: str, prompt: list[int], max_tokens: int = 2, cache_salt: str | None = None,
                 lora_request: LoRARequest | None = None, mm_features: list | None = None,
                 prompt_embeds: bool = False):
        self.request_id = request_id
        self.prompt_token_ids = None if prompt_embeds else list(prompt)
        self._all_token_ids = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.max_tokens = max_tokens
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        self.num_external_computed_tokens = 0
        self.num_preemptions = 0
        self.cache_salt = cache_salt
        self.lora_request = lora_request
        self.mm_features = mm_features or []
        self.status = RequestStatus.WAITING
        self.kv_transfer_params = None

    @property
    def all_token_ids(self) -> tuple:
        return tuple(self._all_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._all_token_ids) - self.num_prompt_tokens

    def append_output_token_ids(self, token: int) -> None:
        self._all_token_ids.append(token)

    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED


@dataclass
class KVCacheBlocks:
    """vllm/v1/core/kv_cache_manager.py: KVCacheBlocks (one group)."""

    block_ids: list[int]

    def get_block_ids(self, allow_none: bool = False):
        if allow_none and not self.block_ids:
            return None
        return (list(self.block_ids),)


@dataclass
class NewRequestData:
    """vllm/v1/core/sched/output.py: NewRequestData."""

    req_id: str
    prompt_token_ids: list[int] | None
    block_ids: tuple
    num_computed_tokens: int
    lora_request: Any = None
    mm_features: list = field(default_factory=list)


@dataclass
class CachedRequestData:
    """vllm/v1/core/sched/output.py: CachedRequestData."""

    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set = field(default_factory=set)
    new_token_ids: list = field(default_factory=list)
    all_token_ids: dict = field(default_factory=dict)
    new_block_ids: list = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass
class SchedulerOutput:
    """vllm/v1/core/sched/output.py: SchedulerOutput."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]
    preempted_req_ids: set[str] | None = None
    kv_connector_metadata: Any = None


@dataclass
class KVConnectorOutput:
    """vllm/v1/outputs.py: KVConnectorOutput."""

    finished_sending: set[str] | None = None
    finished_recving: set[str] | None = None
    invalid_block_ids: set[int] = field(default_factory=set)


@dataclass
class ForwardContext:
    """vllm/forward_context.py: ForwardContext (attn_metadata per layer name)."""

    attn_metadata: dict | None
    virtual_engine: int = 0
