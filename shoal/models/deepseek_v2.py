"""DeepSeek-V2, V2-Lite, V3 and R1: Multi-head Latent Attention + DeepSeekMoE (+ MTP), config-driven.

token ids → embed → N × [x += MLA(norm(x)); x += FFN(norm(x))] → norm → lm_head, where FFN is a
dense SwiGLU MLP for the first `first_k_dense_replace` layers and DeepSeekMoE after (every
`moe_layer_freq`-th layer).

- MLA (V2 §2.1): queries through a low-rank bottleneck (`q_a_proj` → RMSNorm → `q_b_proj`; V2-Lite
  has a plain `q_proj`), keys and values compressed jointly into the latent `c_kv`
  (`kv_a_proj_with_mqa` → RMSNorm) with a decoupled, shared rotary key `k_pe`; `kv_b_proj` holds
  W_UK and W_UV. Only `[c_kv | k_pe]` is cached (see layers/mla.py for the naive/absorbed forms).
- YaRN: the rotary part uses DeepSeek's YaRN frequencies and cos/sin mscale; the softmax scale is
  qk_head_dim^-0.5 · mscale(factor, mscale_all_dim)².
- DeepSeekMoE (V2 §2.2, V3 §2.1.2): shared experts always on, routed experts picked by the gate
  (layers/moe.py: softmax or sigmoid scores, group-limited top-k, `noaux_tc` bias for selection).
- MTP (V3 §2.2): `num_nextn_predict_layers` extra blocks (checkpoint layers N, N+1, ...) that
  combine the main model's final hidden state at position i with the embedding of token i+1 and
  predict token i+2. Loaded when the checkpoint ships them; their cache is opt-in.
- FP8 checkpoints (`weight_scale_inv` per 128×128 block) are dequantized while loading.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from shoal.config import ModelConfig
from shoal.distributed import tp_all_reduce, tp_group
from shoal.forward_batch import ForwardBatch
from shoal.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shoal.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from shoal.layers.mla import MLAMode, MultiLatentAttention
from shoal.layers.moe import FusedMoE, select_experts
from shoal.layers.norm import RMSNorm, pre_norm_block
from shoal.layers.rotary import RotaryEmbedding, yarn_softmax_scale
from shoal.loader.fp8 import block_size_of, dequantize_fp8_stream
from shoal.models.weights import check_all_loaded, load_named_weights

log = logging.getLogger("shoal")

LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps in every DeepSeek release


# ---------------------------------------------------------------------------------------- MLA
class DeepseekV2MLA(nn.Module):
    """Multi-head Latent Attention: projections and decoupled RoPE around the latent-cache layer."""

    def __init__(self, cfg: ModelConfig, mla_mode: MLAMode = "auto") -> None:
        super().__init__()
        heads = cfg.num_attention_heads
        self.num_heads = heads // tp_group().size
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(d, cfg.q_lora_rank, bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, heads * self.qk_head_dim)
        else:
            self.q_proj = ColumnParallelLinear(d, heads * self.qk_head_dim)
        self.kv_a_proj_with_mqa = ReplicatedLinear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = RowParallelLinear(heads * cfg.v_head_dim, d, bias)
        self.rotary = RotaryEmbedding(
            cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
            interleaved=cfg.rope_interleave,
        )
        self.attn = MultiLatentAttention(
            self.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
            scale=yarn_softmax_scale(self.qk_head_dim, cfg.rope_scaling), kv_b_proj=self.kv_b_proj, mode=mla_mode,
        )

    def forward(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(t, self.num_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1
        )  # [T, H, N], [T, H, R]
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [T, C]
        q_pe = self.rotary(fb.positions, q_pe)
        k_pe = self.rotary(fb.positions, k_pe.unsqueeze(1)).squeeze(1)  # [T, R], shared by all heads
        o = self.attn(q_nope, q_pe, c_kv, k_pe, fb.attn)  # [T, H, V]
        return self.o_proj(o.reshape(t, self.num_heads * self.v_head_dim))


# ---------------------------------------------------------------------------------------- FFN
class DeepseekV2MLP(nn.Module):
    """SwiGLU expert: the dense FFN of the first layers, and the shared experts (fused as one)."""

    def __init__(self, hidden_size: int, intermediate_size: int, reduce: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_mul(x))


class DeepseekV2Gate(nn.Module):
    """Router: token-to-expert affinity (kept in float32) and top-k expert selection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.scoring_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(e, dtype=torch.float32), requires_grad=False)
            if cfg.topk_method == "noaux_tc" else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return select_experts(
            logits, self.top_k, self.scoring_func, self.topk_method, self.n_group, self.topk_group,
            self.norm_topk_prob, self.routed_scaling_factor, self.e_score_correction_bias,
        )


class DeepseekV2MoE(nn.Module):
    """DeepSeekMoE: y = Σ_shared FFN(x) + Σ_{i ∈ top-k} g_i · FFN_i(x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = DeepseekV2Gate(cfg)
        self.experts = FusedMoE(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            DeepseekV2MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, reduce=False)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)  # [T, K]
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return tp_all_reduce(y)


# ---------------------------------------------------------------------------------------- blocks
class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, mla_mode: MLAMode = "auto") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DeepseekV2MLA(cfg, mla_mode)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            DeepseekV2MoE(cfg) if cfg.is_moe_layer(layer_idx) else DeepseekV2MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return pre_norm_block(x, residual, self.input_layernorm, lambda h: self.self_attn(h, fb),
                              self.post_attention_layernorm, self.mlp)


class DeepseekV2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, mla_mode: MLAMode = "auto") -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(cfg, i, mla_mode) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed_tokens(fb.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, fb)
        return self.norm(x, residual)[0]


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)


class DeepseekV2MTPLayer(DeepseekV2DecoderLayer):
    """Multi-Token Prediction module k: h' = Block(W_eh [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]),
    logits of t_{i+2} = Head(RMSNorm(h')). Layout and names as DeepSeek-V3's checkpoint layer 61."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, mla_mode: MLAMode = "auto") -> None:
        super().__init__(cfg, layer_idx, mla_mode)
        d = cfg.hidden_size
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, d)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * d, d, bias=False)
        self.shared_head = SharedHead(cfg)
        self.self_attn.attn.cache_enabled = False  # opt-in: see DeepseekV2ForCausalLM.enable_mtp_cache

    def predict(self, next_ids: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        e = self.embed_tokens(next_ids)
        e = e.masked_fill((fb.positions == 0).unsqueeze(-1), 0)  # position 0 has no previous token to pair with
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(hidden)], dim=-1))
        h, residual = super().forward(x, None, fb)
        return h + residual

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head.compute_logits(self.shared_head.norm(h))


# ---------------------------------------------------------------------------------------- LM
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class DeepseekV2ForCausalLM(nn.Module):
    stacked_params = [
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, cfg: ModelConfig, mla_mode: MLAMode = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekV2Model(cfg, mla_mode)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(
            DeepseekV2MTPLayer(cfg, n + k, mla_mode) for k in range(cfg.num_nextn_predict_layers or 0)
        )

    # ------------------------------------------------------------------ forward
    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        return self.model(fb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def forward_mtp(self, fb: ForwardBatch, hidden: torch.Tensor, next_ids: torch.Tensor, depth: int = 0) -> torch.Tensor:
        """MTP module `depth` on the batch: `hidden` [T, D] is the main model's output (or the
        previous MTP module's) and `next_ids` [T] the token after each position; returns [T, D]
        whose logits (`compute_mtp_logits`) predict the token two (depth + 2) places ahead."""
        if depth >= len(self.mtp):
            raise ValueError(f"MTP module {depth} not loaded (this model has {len(self.mtp)})")
        return self.mtp[depth].predict(next_ids, hidden, fb)

    def compute_mtp_logits(self, mtp_hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return self.mtp[depth].compute_logits(mtp_hidden)

    def enable_mtp_cache(self) -> None:
        """Give the MTP blocks' attention a cache too (call before the runner allocates caches)."""
        for layer in self.mtp:
            layer.self_attn.attn.cache_enabled = True

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Cache bytes one token costs across all layers (the latent + rope key per layer)."""
        return sum(
            dtype_bytes * sum(s[0] for s in m.kv_cache_spec().values())
            for m in self.modules() if isinstance(m, MultiLatentAttention)
        )

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.config
        block = block_size_of(cfg.quantization_config)
        if block is not None:
            weights = dequantize_fp8_stream(weights, block)
        n_main, n_mtp = cfg.num_hidden_layers, len(self.mtp)
        seen_mtp: set[int] = set()
        experts: list[FusedMoE] = []

        def route() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in weights:
                if "rotary_emb.inv_freq" in name or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                m = _LAYER.match(name)
                if m and int(m.group(1)) >= n_main:  # an MTP module's tensor
                    k = int(m.group(1)) - n_main
                    if k >= n_mtp:
                        continue
                    seen_mtp.add(k)
                    name = f"mtp.{k}.{m.group(2)}"
                e = _EXPERT.match(name)
                if e:
                    moe = self.get_submodule(e.group(1)).experts
                    moe.load_expert(int(e.group(2)), e.group(3), t)
                    if moe not in experts:
                        experts.append(moe)
                    continue
                yield name, t

        loaded = load_named_weights(self, route(), self.stacked_params)
        names = {id(p): n for n, p in self.named_parameters()}
        for moe in experts:
            w13_done, w2_done = moe.fully_loaded()
            if w13_done:
                loaded.add(names[id(moe.w13)])
            if w2_done:
                loaded.add(names[id(moe.w2)])
        if n_mtp and not seen_mtp:
            log.warning(
                "config names %d MTP layer(s) but the checkpoint has no weights for them (layer %d+); "
                "loading without MTP", n_mtp, n_main,
            )
            self.mtp = nn.ModuleList()
        elif n_mtp and len(seen_mtp) < n_mtp:
            self.mtp = nn.ModuleList(list(self.mtp)[: min(set(range(n_mtp)) - seen_mtp)])
        if cfg.tie_word_embeddings:
            loaded.add("lm_head.weight")
        check_all_loaded(self, loaded)

    def process_weights_after_loading(self) -> None:
        """Precompute the absorbed MLA weights (W_UK, W_UV) from each kv_b_proj."""
        for m in self.modules():
            if isinstance(m, MultiLatentAttention):
                m.process_weights_after_loading()
