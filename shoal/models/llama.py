"""Llama 2/3 (incl. llama3 rope scaling), SmolLM2, Mistral and DeepSeek-R1-Distill-Llama.

token ids → embed → N × [x += attn(norm(x)); x += mlp(norm(x))] → norm → lm_head (each residual
add runs inside the norm after it: the platform's `add_rms_norm`).
Attention is grouped-query with rotary positions over the paged KV cache; the MLP is SwiGLU.
Projections are fused (qkv, gate+up) and tensor-parallel.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from shoal.backends import ops
from shoal.backends.specs import DenseLayerSpec, DenseStackSpec
from shoal.config import ModelConfig
from shoal.forward_batch import ForwardBatch
from shoal.layers.attention import PagedAttention
from shoal.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shoal.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shoal.layers.norm import RMSNorm, pre_norm_block
from shoal.layers.rotary import RotaryEmbedding
from shoal.models.weights import check_all_loaded, load_named_weights


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads, qkv_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(d, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, d**-0.5)

    def forward(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = self.rotary(fb.positions, q.view(t, self.num_heads, self.head_dim))
        k = self.rotary(fb.positions, k.view(t, self.num_kv_heads, self.head_dim))
        o = self.attn(q, k, v.view(t, self.num_kv_heads, self.head_dim), fb.attn)  # [T, H, D]
        return self.o_proj(o.reshape(t, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_mul(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, qkv_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, fb: ForwardBatch,
                spec: DenseLayerSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The platform's fused layer where it takes this one (`dense_decoder_layer`), else op by op."""
        out = ops.dense_decoder_layer(spec or self.spec(), x, residual, fb)
        return self.forward_ops(x, residual, fb) if out is None else out

    def forward_ops(self, x: torch.Tensor, residual: torch.Tensor | None,
                    fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer op by op."""
        return pre_norm_block(x, residual, self.input_layernorm, lambda h: self.self_attn(h, fb),
                              self.post_attention_layernorm, self.mlp)

    def spec(self) -> DenseLayerSpec:
        """This layer as tensors and dims (backends/specs.py), for a platform's fused call."""
        attn, mlp, rot = self.self_attn, self.mlp, self.self_attn.rotary
        return DenseLayerSpec(
            in_norm=self.input_layernorm.weight, post_norm=self.post_attention_layernorm.weight,
            eps=self.input_layernorm.eps, post_eps=self.post_attention_layernorm.eps,
            qkv=attn.qkv_proj.quant, o=attn.o_proj.quant, gate_up=mlp.gate_up_proj.quant, down=mlp.down_proj.quant,
            qkv_bias=attn.qkv_proj.bias,
            other_bias=any(lin.bias is not None for lin in (attn.o_proj, mlp.gate_up_proj, mlp.down_proj)),
            num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            intermediate=mlp.down_proj.in_features, cos=rot.cos, sin=rot.sin, rot_dim=rot.rot_dim,
            interleaved=rot.interleaved, scale=attn.attn.scale, k_cache=attn.attn.k_cache,
            v_cache=attn.attn.v_cache, tp_size=attn.o_proj.tp.size)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, qkv_bias) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        x, stack = self.embed_tokens(fb.input_ids), self.stack_spec()
        out = ops.dense_decoder_stack(stack, x, fb)  # the whole step in one call, where the platform can
        if out is None:
            residual = None
            for layer, spec in zip(self.layers, stack.layers):
                x, residual = layer(x, residual, fb, spec)
            out = (x, residual)
        return self.norm(*out)[0]

    def stack_spec(self) -> DenseStackSpec:
        """The layers as specs, rebuilt when their KV caches are rebound (kept between steps: a platform
        keeps what it derives from them in their `derived` dicts; not kept inside a compiled graph).
        The check reads each layer's attention module from a list kept beside the spec (nn.Module
        attribute lookups made it ~100 µs a step for 30 layers)."""
        compiling = torch.compiler.is_compiling()
        hit = None if compiling else self.__dict__.get("_stack_spec")
        if hit is not None and all(a.k_cache is k and a.v_cache is v for a, k, v in hit[0]):
            return hit[1]
        attns = [layer.self_attn.attn for layer in self.layers]
        spec = DenseStackSpec(tuple(layer.spec() for layer in self.layers))
        if not compiling:
            self.__dict__["_stack_spec"] = ([(a, a.k_cache, a.v_cache) for a in attns], spec)
        return spec


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    stacked_params = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.qkv_bias or cfg.attention_bias)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        return self.model(fb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.config.tie_word_embeddings else ())
        loaded = load_named_weights(self, weights, self.stacked_params, skip=skip)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        check_all_loaded(self, loaded)
