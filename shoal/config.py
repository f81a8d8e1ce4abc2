"""Frozen configuration dataclasses. Standard library only: the planner imports this too.

`ModelConfig` is the one description of a model's architecture, built either from a Hugging Face
`config.json` dict (`ModelConfig.from_hf_dict`) or from GGUF metadata (the GGUF loader maps its
keys onto the same HF-style dict first). Derived values (`head_dim`, `kv_bytes_per_token`, ...)
are properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ShoalError

# model_type values shoal can run, and the family (model file) each one maps to
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v2",
}


class ConfigError(ShoalError, ValueError):
    """A config field is missing or unsupported; the message names the field and the fix."""


def _rope_scaling(d: dict[str, Any]) -> dict[str, Any] | None:
    """DeepSeek's published configs use `rope_scaling`; transformers 5 writes `rope_parameters`
    (which also carries `rope_theta` and `rope_type: default` when unscaled)."""
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    rs["rope_type"] = kind
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    return rs


def _rope_theta(d: dict[str, Any]) -> float:
    if "rope_theta" in d and d["rope_theta"] is not None:
        return float(d["rope_theta"])
    rp = d.get("rope_parameters") or {}
    return float(rp.get("rope_theta", 10000.0))


def _as_tuple(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(int(v) for v in x)
    return (int(x),)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    head_dim_override: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qkv bias (Qwen2 has it regardless of this flag)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    # --- DeepSeek MLA ---
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # --- DeepSeek MoE ---
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_nextn_predict_layers: int = 0
    # checkpoint quantization (e.g. DeepSeek FP8 block scales); None for plain weights
    quantization_config: dict[str, Any] | None = None
    # the raw dict, for fields a model file needs that are not promoted above
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if "text_config" in d and "model_type" not in d:
            d = d["text_config"]
        mt = d.get("model_type")
        if mt is None:
            raise ConfigError("config.json has no 'model_type' field; shoal needs it to pick the model code")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported architecture model_type={mt!r}; shoal runs: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"config for model_type={mt!r} is missing field(s) {missing}")
        n_heads = int(d["num_attention_heads"])
        kv = d.get("num_key_value_heads") or n_heads
        head_dim = d.get("head_dim")
        fields = dict(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d.get("intermediate_size") or 4 * int(d["hidden_size"])),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(kv),
            max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
            rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
            rope_theta=_rope_theta(d),
            rope_scaling=_rope_scaling(d),
            head_dim_override=int(head_dim) if head_dim else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) or mt == "qwen2",
            hidden_act=str(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_tuple(d.get("eos_token_id")),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            quantization_config=d.get("quantization_config"),
            extra=dict(d),
        )
        if SUPPORTED_MODEL_TYPES[mt] == "deepseek_v2":
            moe_keys = [
                "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group", "topk_method",
                "scoring_func", "norm_topk_prob", "routed_scaling_factor", "num_nextn_predict_layers",
            ]
            for k in moe_keys:
                if k in d and d[k] is not None:
                    fields[k] = d[k]
            for k in ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]:
                if not d.get(k):
                    raise ConfigError(f"DeepSeek config (model_type={mt!r}) is missing MLA field {k!r}")
            fields["q_lora_rank"] = d.get("q_lora_rank")
            # transformers 5 sets rope_interleave for DeepSeek; the original checkpoints imply it
            fields["rope_interleave"] = bool(d.get("rope_interleave", True))
            if fields.get("n_routed_experts") is None:
                fields["n_routed_experts"] = 0
            if fields.get("n_shared_experts") is None:
                fields["n_shared_experts"] = 0
            # transformers 5 writes DeepSeek-V3 configs without these keys; its V3 gate is always
            # the sigmoid + noaux_tc one (as in every published V3/R1 config)
            if mt == "deepseek_v3":
                fields.setdefault("scoring_func", "sigmoid")
                fields.setdefault("topk_method", "noaux_tc")
        return cls(**fields)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    @property
    def family(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]

    @property
    def is_mla(self) -> bool:
        return self.family == "deepseek_v2"

    @property
    def head_dim(self) -> int:
        if self.head_dim_override:
            return self.head_dim_override
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width for MLA (nope + rope), for plain attention `head_dim`."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def kv_entries_per_token_per_layer(self) -> int:
        """Values cached per token per layer: MLA keeps only the latent + rope key."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.num_hidden_layers * self.kv_entries_per_token_per_layer * dtype_bytes

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % max(1, self.moe_layer_freq) == 0
        )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # bytes for the KV cache; None → the platform's default share of free memory
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    num_blocks_override: int | None = None  # tests force a tiny cache


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    max_waiting: int = 1024  # the server answers 503 above this


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    rank: int = 0


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # path, HF cache id, .gguf, or None for the default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str | None = None  # None → detected platform
    quantization: str = "none"  # none | int8 | int4
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    enforce_eager: bool = True
