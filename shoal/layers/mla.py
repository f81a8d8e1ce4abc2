"""Multi-head Latent Attention (DeepSeek-V2 §2.1) over a paged cache that holds only the latent.

The model computes, per new token, the normalised KV latent `c_kv` [C] and the rotated decoupled
key `k_pe` [R] (shared by all heads), plus the per-head query halves `q_nope` [H, N] and rotated
`q_pe` [H, R]. This layer writes `[c_kv | k_pe]` into the cache (C + R values per token per layer,
nothing more) and attends in one of two mathematically equal forms:

- naive: expand the gathered latent through `kv_b_proj` (W_UK, W_UV) into per-head keys
  `[k_nope | k_pe]` and values, then ordinary causal attention. Cheap for long prefill chunks.
- absorbed: fold W_UK into the query (q_latent = q_nope · W_UK) and W_UV into the output, and
  attend directly over the cached latent (`ops.mla_attention`). Cheap for decode.

`mode="auto"` picks the cheaper form per batch from a FLOP count; decode always uses absorbed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shoal.backends import native, ops
from shoal.forward_batch import AttentionMetadata

MLAMode = Literal["naive", "absorbed", "auto"]


class MultiLatentAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        scale: float,
        kv_b_proj: nn.Module,
        mode: MLAMode = "auto",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads  # heads on this tensor-parallel rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.scale = scale
        self.mode: MLAMode = mode
        # the up-projection lives in the model (its checkpoint name is `self_attn.kv_b_proj`);
        # kept out of this module's children so it is owned, loaded and counted once
        self._kv_b_proj = [kv_b_proj]
        # absorbed weights, derived from kv_b_proj after loading: W_UK [H, N, C], W_UV [H, V, C]
        self.w_uk: torch.Tensor | None
        self.w_uv: torch.Tensor | None
        self.register_buffer("w_uk", None, persistent=False)
        self.register_buffer("w_uv", None, persistent=False)
        # bound by the model runner: [num_blocks, block_size, C + R]
        self.kv_cache: torch.Tensor | None = None
        # an MTP block's attention needs no cache until speculative decoding asks for one
        self.cache_enabled = True

    # ------------------------------------------------------------------ cache protocol
    def kv_cache_spec(self) -> dict[str, tuple[int, ...]]:
        if not self.cache_enabled:
            return {}
        return {"kv": (self.kv_lora_rank + self.qk_rope_head_dim,)}

    def bind_kv_cache(self, caches: dict[str, torch.Tensor]) -> None:
        self.kv_cache = caches.get("kv")

    # ------------------------------------------------------------------ weights
    def kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj's weight as [H, N + V, C] (dequantized if the layer holds packed data)."""
        lin = self._kv_b_proj[0]
        w = lin.weight
        if getattr(lin, "quant", None) is not None and hasattr(lin.quant, "dequantize"):
            w = lin.quant.dequantize()
        return w.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)

    def process_weights_after_loading(self) -> None:
        """Split kv_b_proj into W_UK [H, N, C] and W_UV [H, V, C] for the absorbed form."""
        w = self.kv_b_weight()
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        self.w_uk, self.w_uv = w_uk.contiguous(), w_uv.contiguous()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        q_nope: torch.Tensor,  # [T, H, N]
        q_pe: torch.Tensor,  # [T, H, R] rotated
        c_kv: torch.Tensor,  # [T, C] after kv_a_layernorm
        k_pe: torch.Tensor,  # [T, R] rotated
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H, V]
        assert self.kv_cache is not None, "MLA cache not bound: the model runner binds it before the first step"
        ops.store_kv(self.kv_cache, meta.slot_mapping, torch.cat([c_kv, k_pe], dim=-1))
        if self.choose_mode(meta) == "naive":
            return self.forward_naive(q_nope, q_pe, meta)
        return self.forward_absorbed(q_nope, q_pe, meta)

    def choose_mode(self, meta: AttentionMetadata) -> Literal["naive", "absorbed"]:
        if self.mode != "auto":
            return self.mode
        if meta.decode_only:
            return "absorbed"
        c, n, r, v = self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        pairs = sum(q * s for q, s in zip(meta.query_lens_cpu, meta.seq_lens_cpu))  # (query, key) pairs
        tokens = sum(meta.query_lens_cpu)
        context = sum(meta.seq_lens_cpu)
        # multiply-adds per head: absorbed attends in width C+R (scores) and C (values) and projects
        # q and o through W_UK / W_UV; naive expands every context token through kv_b_proj first
        absorbed = pairs * (2 * c + r) + tokens * c * (n + v)
        naive = context * c * (n + v) + pairs * (n + r + v)
        return "naive" if naive < absorbed else "absorbed"

    def forward_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.w_uk is None:
            self.process_weights_after_loading()
        q_latent = torch.einsum("thn,hnc->thc", q_nope, self.w_uk)  # [T, H, C]
        o_latent = ops.mla_attention(q_latent, q_pe, self.kv_cache, meta, self.scale)  # [T, H, C]
        return torch.einsum("thc,hvc->thv", o_latent, self.w_uv)  # [T, H, V]

    def forward_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        c, n = self.kv_lora_rank, self.qk_nope_head_dim
        w = self.kv_b_weight()  # [H, N + V, C]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, N + R]
        outs = []
        start = 0
        for i, (qn, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            ctx = native.gather_context(self.kv_cache, meta.block_tables[i], length, meta.block_size)  # [L, C + R]
            kv = torch.einsum("lc,hkc->hlk", ctx[:, :c].to(w.dtype), w)  # [H, L, N + V]
            k_nope, v = kv[..., :n], kv[..., n:]
            k_pe = ctx[:, c:].to(w.dtype).unsqueeze(0).expand(self.num_heads, -1, -1)  # [H, L, R]
            k = torch.cat([k_nope, k_pe], dim=-1)  # [H, L, N + R]
            qi = q[start : start + qn].transpose(0, 1)  # [H, qn, N + R]
            mask = torch.ones(qn, length, dtype=torch.bool, device=q.device).tril(length - qn)
            o = F.scaled_dot_product_attention(qi, k.to(qi.dtype), v.to(qi.dtype), attn_mask=mask, scale=self.scale)
            outs.append(o.transpose(0, 1))  # [qn, H, V]
            start += qn
        return torch.cat(outs, dim=0)
