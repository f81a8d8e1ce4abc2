"""Tiny random Hugging Face checkpoints for the end-to-end part of `shoal conformance`, made
with `transformers`' own config classes and `save_pretrained` (a test/dev dependency: without
it the end-to-end part reports "not run"). A small word-level tokenizer.json is built with
`tokenizers` so each directory loads like a real model directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

VOCAB = 256


def write_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
        "model_max_length": 512,
    }))


_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512,
    initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg)


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(_COMMON, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(Qwen2Config(**kw, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6))
    with torch.no_grad():  # random q/k/v biases (transformers starts them at zero, which tests nothing)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _deepseek_v3() -> Any:
    """DeepSeek-V3-like: MLA (q_lora 48, kv_lora 32 + rope 8, 8 heads), one dense layer then a
    MoE layer with 16 routed experts (top-4 in 2 of 4 groups) and a shared expert."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        **_COMMON, moe_intermediate_size=32, num_attention_heads=8, num_key_value_heads=8,
        n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        rms_norm_eps=1e-6,
    )
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # a non-zero routing bias, so the bias-corrected top-k is exercised
        for layer in model.model.layers:
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.05)
    return model


TINY_MODELS: dict[str, tuple[str, Callable[[], Any]]] = {
    # name: (shoal model file that must exist, builder)
    "llama": ("shoal.models.llama", _llama),
    "qwen2": ("shoal.models.qwen2", _qwen2),
    "deepseek_v3": ("shoal.models.deepseek_v2", _deepseek_v3),
}


def make_tiny(name: str, path: Path, seed: int) -> Path:
    """Write tiny random checkpoint `name` (a TINY_MODELS key) into `path`."""
    torch.manual_seed(seed)
    model = TINY_MODELS[name][1]().eval()
    with torch.no_grad():  # norm weights start at 1, which would hide a norm that ignores its weight
        for pname, param in model.named_parameters():
            if "norm" in pname and param.dim() == 1:
                param.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return path
