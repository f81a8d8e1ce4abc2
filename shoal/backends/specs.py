"""Typed descriptions of model pieces a platform may run as one fused call, built by the model (which
knows its own attribute names) so that a backend reads tensors and dims, never an nn.Module.

- `DenseLayerSpec`: one pre-norm decoder layer of a dense model (Llama, Qwen2 and their distills:
  grouped-query attention with rotary positions over the paged cache, SwiGLU MLP);
- `DenseStackSpec`: all of a model's decoder layers, for a call that runs a whole step.

The model rebuilds its specs when its KV caches are rebound; a platform may keep what it works out from
a spec in the spec's `derived` dict (computed once, reused every step). The ops that take them are
`dense_decoder_layer` and `dense_decoder_stack` (backends/native.py: the native forms decline, and the
model runs its layers op by op).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class DenseLayerSpec:
    """x → h = rms_norm(x + residual; in_norm, eps); q, k, v = h·qkvᵀ (+ qkv_bias); rotary on q, k;
    k, v → the paged cache; o = attention(q)·oᵀ; h2 = rms_norm(o + res; post_norm, post_eps);
    out = down(silu(gate(h2)) · up(h2)) with gate_up = [gate; up]."""
    in_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    eps: float
    post_eps: float
    # the projections' quantized weights (layers.quant.QuantizedWeight: [out, in] with `out_features`,
    # `in_features` and a `kernel_cache` of packed forms), None for one that is not quantized
    qkv: Any
    o: Any
    gate_up: Any
    down: Any
    qkv_bias: torch.Tensor | None  # [q + 2·kv]
    other_bias: bool  # o, gate_up or down carries a bias
    num_heads: int  # on this rank
    num_kv_heads: int
    head_dim: int
    intermediate: int  # the MLP's width on this rank
    cos: torch.Tensor  # [max_positions, rot_dim / 2]
    sin: torch.Tensor
    rot_dim: int
    interleaved: bool
    scale: float  # softmax scale
    k_cache: torch.Tensor | None  # [blocks, block_size, kv_heads, head_dim]; None before binding
    v_cache: torch.Tensor | None
    tp_size: int
    derived: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class DenseStackSpec:
    layers: tuple[DenseLayerSpec, ...]
    derived: dict = field(default_factory=dict, repr=False)
