"""Paged attention layer for MHA/GQA models: writes the new K/V into the paged cache, then attends
each request's new tokens over its cached context through the platform's `paged_attention` op."""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends import ops
from shoal.forward_batch import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # bound by the model runner: [num_blocks, block_size, num_kv_heads, head_dim] each
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def kv_cache_spec(self) -> dict[str, tuple[int, ...]]:
        """Per-token shapes of the cache tensors this layer needs."""
        return {"k": (self.num_kv_heads, self.head_dim), "v": (self.num_kv_heads, self.head_dim)}

    def bind_kv_cache(self, caches: dict[str, torch.Tensor]) -> None:
        self.k_cache, self.v_cache = caches["k"], caches["v"]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [T, H, D]; k, v [T, Hkv, D]
        assert self.k_cache is not None, "KV cache not bound: the model runner binds it before the first step"
        ops.store_kv(self.k_cache, meta.slot_mapping, k)
        ops.store_kv(self.v_cache, meta.slot_mapping, v)
        return ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
