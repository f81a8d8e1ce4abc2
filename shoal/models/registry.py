"""model family (from ModelConfig.family) → model class. Imports are lazy so one family's
dependencies never load for another."""

from __future__ import annotations

import importlib

from torch import nn

from shoal.config import ModelConfig

_MODELS = {
    "llama": ("shoal.models.llama", "LlamaForCausalLM"),
    "qwen2": ("shoal.models.qwen2", "Qwen2ForCausalLM"),
    "deepseek_v2": ("shoal.models.deepseek_v2", "DeepseekV2ForCausalLM"),
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    mod, cls = _MODELS[cfg.family]
    return getattr(importlib.import_module(mod), cls)
