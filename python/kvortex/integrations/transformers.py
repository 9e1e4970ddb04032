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

transformers has no hook that hands a layer's KV out while the prefill computes it, so ``save``
runs after the forward pass (one store of every layer, through a staging tensor); ``restore`` fills
a staging tensor ``[layers, 2, kv_heads, tokens, head_dim]`` through one layer-by-layer retrieve and
builds the ``DynamicCache`` from views of it: each layer's K and V are contiguous
``[1, kv_heads, tokens, head_dim]`` tensors, as transformers makes them, and nothing is copied. Only whole chunks are kept, and the last prompt token
is always left to the model, so the forward pass over the tail yields the next token's logits.
Batch size 1 per call. PyTorch is imported here, not by ``kvortex`` itself.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

import kvortex


def _kv_shape(config: Any) -> Tuple[int, int, int]:
    layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
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
        self.layers, self.heads, self.dim = _kv_shape(config)
        g = engine.geometry
        if (g["num_layers"], g["kv_heads"], g["head_dim"]) != (self.layers, self.heads, self.dim):
            raise ValueError(f"PrefixStore: the engine holds {g['num_layers']} layers x {g['kv_heads']} KV heads x "
                             f"{g['head_dim']}, the model has {self.layers} x {self.heads} x {self.dim}")
        self.chunk = engine.chunk_tokens
        self._pending = []  # (ticket, staging): stores still reading their staging tensors

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
        for i, layer in enumerate(layers):
            staging[i, 0].copy_(layer.keys[0, :, :n])  # [heads, seq, dim]
            staging[i, 1].copy_(layer.values[0, :, :n])
        event = torch.cuda.Event() if staging.is_cuda else None
        if event is not None:
            event.record()
        ticket = self.engine.store(ids[:n], self._layout(staging), None, event.cuda_event if event is not None else 0)
        if not wait:
            self._pending.append((ticket, staging))  # the staging tensor lives until the copies are done
            return 0
        return ticket.wait()

    def flush(self) -> int:
        """Waits for the stores `save(wait=False)` queued; returns the tokens they wrote."""
        done = 0
        for ticket, _ in self._pending:
            done += ticket.wait()
        self._pending.clear()
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

        self.flush()
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
        if got < hit:  # a tier could not deliver everything: keep what came, contiguous
            staging = staging[:, :, :, :got].contiguous()
        pairs = [(staging[i, 0].unsqueeze(0), staging[i, 1].unsqueeze(0)) for i in range(self.layers)]
        try:
            cache = DynamicCache(ddp_cache_data=pairs, config=self.config)
        except TypeError:
            cache = DynamicCache(ddp_cache_data=pairs)
        return cache, got
