"""Model description for the planner, derived from the engine's `ModelConfig` (no torch).

Everything here is closed-form arithmetic on the config: parameter counts per operator group,
activated parameters per token, KV bytes per token and FLOPs per token (linear layers plus
attention over the context). `shoal.planner.cost` turns these into time on a chip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.config import SUPPORTED_MODEL_TYPES, ModelConfig

DATA_DIR = Path(__file__).resolve().parent / "data"
MODELS_DIR = DATA_DIR / "models"

# short names accepted on the command line -> shipped config file
MODEL_ALIASES: dict[str, str] = {
    "deepseek-v3": "DeepSeek-V3",
    "v3": "DeepSeek-V3",
    "deepseek-r1": "DeepSeek-R1",
    "r1": "DeepSeek-R1",
    "deepseek-v2": "DeepSeek-V2",
    "deepseek-v2-lite": "DeepSeek-V2-Lite",
    "v2-lite": "DeepSeek-V2-Lite",
    "r1-distill-qwen-1.5b": "DeepSeek-R1-Distill-Qwen-1.5B",
    "r1-distill-qwen-7b": "DeepSeek-R1-Distill-Qwen-7B",
    "r1-distill-qwen-14b": "DeepSeek-R1-Distill-Qwen-14B",
    "r1-distill-qwen-32b": "DeepSeek-R1-Distill-Qwen-32B",
    "r1-distill-llama-8b": "DeepSeek-R1-Distill-Llama-8B",
    "r1-distill-llama-70b": "DeepSeek-R1-Distill-Llama-70B",
    "qwen3-8b": "Qwen3-8B",
    "deepseek-r1-0528-qwen3-8b": "Qwen3-8B",
    "llama-3.2-3b": "Llama-3.2-3B-Instruct",
    "smollm2-135m": "SmolLM2-135M-Instruct",
}

# dense decoder-only architectures ModelConfig does not run but whose cost is that of a
# llama-shaped transformer (GQA attention + SwiGLU FFN); qk-norm etc. are negligible for cost.
_LLAMA_SHAPED = {"qwen3", "mistral", "qwen2", "llama"}

# bytes per weight element for each linear-layer precision the planner knows
WEIGHT_BYTES: dict[str, float] = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0 + 4.0 / (128 * 128),  # e4m3 + fp32 scale per 128x128 block
    "int8": 1.0 + 4.0 / 4096,  # per-channel scales, negligible
    "int4": 0.5 + 2.0 / 32,  # group-32 fp16 scales (~4.5 bits/weight, Q4_K_M-like)
    "fp4": 0.5 + 1.0 / 16,  # NVFP4: e2m1 + fp8 scale per 16
}
PRECISIONS = tuple(WEIGHT_BYTES)


def list_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def resolve_model_path(name: str) -> Path:
    """A path to a config.json/.gguf, a shipped config stem, or an alias."""
    p = Path(name)
    if p.exists():
        return p
    stem = MODEL_ALIASES.get(name.lower(), name)
    for cand in (MODELS_DIR / f"{stem}.json",):
        if cand.exists():
            return cand
    lowered = {s.lower(): s for s in list_models()}
    if stem.lower() in lowered:
        return MODELS_DIR / f"{lowered[stem.lower()]}.json"
    raise FileNotFoundError(
        f"unknown model {name!r}: pass a config.json/.gguf path or one of {', '.join(sorted(MODEL_ALIASES))}"
    )


def _config_dict_from_gguf(path: Path) -> dict[str, Any]:
    """Map GGUF metadata onto an HF-style dict (needs the `gguf` package; imported lazily)."""
    try:
        import gguf  # type: ignore
    except ImportError as e:  # pragma: no cover - optional dependency
        raise RuntimeError("reading GGUF metadata needs the 'gguf' package (pip install gguf)") from e
    r = gguf.GGUFReader(str(path))  # pragma: no cover

    def get(key: str, default: Any = None) -> Any:  # pragma: no cover
        f = r.fields.get(key)
        if f is None:
            return default
        v = f.parts[f.data[0]]
        return v.tolist()[0] if hasattr(v, "tolist") and len(v) == 1 else bytes(v).decode()

    arch = get("general.architecture")  # pragma: no cover
    mt = {"deepseek2": "deepseek_v3", "llama": "llama", "qwen2": "qwen2"}.get(arch, arch)  # pragma: no cover
    p = f"{arch}."  # pragma: no cover
    d = {  # pragma: no cover
        "model_type": mt,
        "vocab_size": len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else get(p + "vocab_size"),
        "hidden_size": get(p + "embedding_length"),
        "intermediate_size": get(p + "feed_forward_length"),
        "num_hidden_layers": get(p + "block_count"),
        "num_attention_heads": get(p + "attention.head_count"),
        "num_key_value_heads": get(p + "attention.head_count_kv"),
        "kv_lora_rank": get(p + "attention.kv_lora_rank"),
        "q_lora_rank": get(p + "attention.q_lora_rank"),
        "qk_rope_head_dim": get(p + "rope.dimension_count"),
        "qk_nope_head_dim": (get(p + "attention.key_length") or 0) - (get(p + "rope.dimension_count") or 0),
        "v_head_dim": get(p + "attention.value_length"),
        "n_routed_experts": get(p + "expert_count"),
        "n_shared_experts": get(p + "expert_shared_count"),
        "num_experts_per_tok": get(p + "expert_used_count"),
        "moe_intermediate_size": get(p + "expert_feed_forward_length"),
        "first_k_dense_replace": get(p + "leading_dense_block_count"),
    }
    return {k: v for k, v in d.items() if v is not None}  # pragma: no cover


def load_model_config(name_or_path: str | os.PathLike[str]) -> tuple[ModelConfig, str]:
    """Returns (ModelConfig, display name). Dense architectures ModelConfig does not run are costed
    as llama-shaped transformers (noted in `ModelSpec.notes`)."""
    path = resolve_model_path(str(name_or_path))
    if path.suffix == ".gguf":
        d = _config_dict_from_gguf(path)
    else:
        d = json.loads(path.read_text())
    return config_from_dict(d), path.stem


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    if "text_config" in d and "model_type" not in d:
        d = d["text_config"]
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES and mt in _LLAMA_SHAPED:
        d = dict(d, model_type="llama", _planner_original_model_type=mt)
    return ModelConfig.from_hf_dict(d)


@dataclass(frozen=True)
class ModelSpec:
    """Per-operator-group parameter counts and per-token costs for one model."""

    name: str
    cfg: ModelConfig
    n_layers: int
    n_moe_layers: int
    n_dense_layers: int
    hidden: int
    vocab: int
    # parameters (elements) per layer
    attn_params: int  # projections (q/kv/o, incl. MLA low-rank) per layer
    dense_ffn_params: int  # one dense FFN layer
    expert_params: int  # one routed expert
    shared_params: int  # all shared experts of one MoE layer
    gate_params: int  # router of one MoE layer
    embed_params: int
    head_params: int  # 0 when tied
    n_experts: int
    top_k: int
    mtp_layer_params: int  # one MTP (next-n) module, 0 if none
    n_mtp_layers: int
    kv_entries_per_layer: int
    attn_core_flops_decode_per_ctx: int  # FLOPs per (query token, cached token) pair per layer, decode path
    attn_core_flops_prefill_per_ctx: int  # same for the prefill path
    notes: tuple[str, ...] = field(default=())

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: ModelConfig, name: str = "model") -> "ModelSpec":
        h = cfg.hidden_size
        L = cfg.num_hidden_layers
        nh = cfg.num_attention_heads
        notes: list[str] = []
        orig = cfg.extra.get("_planner_original_model_type")
        if orig:
            notes.append(f"model_type {orig!r} costed as a llama-shaped dense transformer")
        if cfg.is_mla:
            qk = cfg.qk_head_dim
            if cfg.q_lora_rank:
                q = h * cfg.q_lora_rank + cfg.q_lora_rank * nh * qk
            else:
                q = h * nh * qk
            kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            kv_b = cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            o = nh * cfg.v_head_dim * h
            attn = q + kv_a + kv_b + o
            # absorbed decode: scores over latent+rope, values over the latent
            dec = 2 * nh * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * nh * cfg.kv_lora_rank
            # prefill runs MLA as MHA with qk=192, v=128 per head
            pre = 2 * nh * qk + 2 * nh * cfg.v_head_dim
        else:
            hd = cfg.head_dim
            kvh = cfg.num_key_value_heads
            attn = h * nh * hd + 2 * h * kvh * hd + nh * hd * h
            dec = pre = 4 * nh * hd
        dense_ffn = 3 * h * cfg.intermediate_size
        n_moe = sum(1 for i in range(L) if cfg.is_moe_layer(i))
        if n_moe:
            expert = 3 * h * cfg.moe_intermediate_size
            shared = cfg.n_shared_experts * expert
            gate = h * cfg.n_routed_experts
        else:
            expert = shared = gate = 0
        embed = cfg.vocab_size * h
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
        n_mtp = int(cfg.num_nextn_predict_layers or 0)
        # an MTP module: one decoder layer (MoE if the model is MoE) + eh_proj (2h -> h); shares embed/head
        mtp_layer = (attn + (cfg.n_routed_experts * expert + shared + gate if n_moe else dense_ffn) + 2 * h * h) if n_mtp else 0
        return cls(
            name=name, cfg=cfg, n_layers=L, n_moe_layers=n_moe, n_dense_layers=L - n_moe, hidden=h,
            vocab=cfg.vocab_size, attn_params=attn, dense_ffn_params=dense_ffn, expert_params=expert,
            shared_params=shared, gate_params=gate, embed_params=embed, head_params=head,
            n_experts=cfg.n_routed_experts if n_moe else 0, top_k=cfg.num_experts_per_tok if n_moe else 0,
            mtp_layer_params=mtp_layer, n_mtp_layers=n_mtp,
            kv_entries_per_layer=cfg.kv_entries_per_token_per_layer,
            attn_core_flops_decode_per_ctx=dec, attn_core_flops_prefill_per_ctx=pre, notes=tuple(notes),
        )

    @classmethod
    def load(cls, name_or_path: str) -> "ModelSpec":
        cfg, name = load_model_config(name_or_path)
        return cls.from_config(cfg, name)

    # ---------------------------------------------------------------- parameter counts
    @property
    def is_moe(self) -> bool:
        return self.n_moe_layers > 0

    @property
    def moe_layer_params(self) -> int:
        return self.n_experts * self.expert_params + self.shared_params + self.gate_params

    @property
    def total_params(self) -> int:
        """Main model, excluding MTP modules (DeepSeek-V3: 671B)."""
        return (
            self.n_layers * self.attn_params
            + self.n_dense_layers * self.dense_ffn_params
            + self.n_moe_layers * self.moe_layer_params
            + self.embed_params
            + self.head_params
        )

    @property
    def total_params_with_mtp(self) -> int:
        return self.total_params + self.n_mtp_layers * self.mtp_layer_params

    @property
    def active_params(self) -> int:
        """Parameters touched per token (routed top-k + shared experts), embedding and head included."""
        moe_active = self.top_k * self.expert_params + self.shared_params + self.gate_params
        return (
            self.n_layers * self.attn_params
            + self.n_dense_layers * self.dense_ffn_params
            + self.n_moe_layers * moe_active
            + self.embed_params
            + self.head_params
        )

    def param_bytes(self, precision: str = "bf16", attn_precision: str | None = None) -> float:
        """Checkpoint bytes: linear layers at `precision` (attention projections at `attn_precision`),
        embedding, head and routers in bf16."""
        wb = WEIGHT_BYTES[precision]
        ab = WEIGHT_BYTES[attn_precision or precision]
        lin = (
            self.n_dense_layers * self.dense_ffn_params
            + self.n_moe_layers * (self.n_experts * self.expert_params + self.shared_params)
        )
        return (
            lin * wb
            + self.n_layers * self.attn_params * ab
            + 2.0 * (self.embed_params + self.head_params + self.n_moe_layers * self.gate_params)
        )

    # ---------------------------------------------------------------- per-token costs
    def kv_bytes_per_token(self, kv_bytes: float = 2.0) -> float:
        return self.n_layers * self.kv_entries_per_layer * kv_bytes

    def linear_flops_per_token(self, with_head: bool = True) -> int:
        """2 x activated linear parameters (embedding lookup is free)."""
        moe_active = self.top_k * self.expert_params + self.shared_params + self.gate_params
        lin = (
            self.n_layers * self.attn_params
            + self.n_dense_layers * self.dense_ffn_params
            + self.n_moe_layers * moe_active
        )
        head = (self.head_params or self.embed_params) if with_head else 0
        return 2 * (lin + head)

    def decode_flops_per_token(self, context: int) -> int:
        """FLOPs to generate one token attending to `context` cached tokens."""
        return self.linear_flops_per_token() + self.n_layers * self.attn_core_flops_decode_per_ctx * context

    def prefill_flops(self, isl: int, causal: bool = True) -> int:
        """FLOPs to prefill one prompt of `isl` tokens (head only on the last token)."""
        pairs = isl * (isl + 1) // 2 if causal else isl * isl
        head = self.head_params or self.embed_params
        return (
            isl * self.linear_flops_per_token(with_head=False)
            + 2 * head
            + self.n_layers * self.attn_core_flops_prefill_per_ctx * pairs
        )

    def prefill_flops_per_token(self, isl: int) -> float:
        return self.prefill_flops(isl) / isl

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "total_params": self.total_params,
            "total_params_with_mtp": self.total_params_with_mtp,
            "active_params": self.active_params,
            "kv_bytes_per_token_bf16": self.kv_bytes_per_token(2),
            "bytes_bf16": self.param_bytes("bf16"),
            "bytes_fp8": self.param_bytes("fp8"),
            "bytes_int4": self.param_bytes("int4"),
            "decode_flops_per_token_ctx4096": self.decode_flops_per_token(4096),
            "prefill_flops_per_token_isl4096": self.prefill_flops_per_token(4096),
            "notes": list(self.notes),
        }
