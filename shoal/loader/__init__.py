"""Loading models: where they are (`resolve_model`), what they are (`load_config`), their
weights under Hugging Face names (`iter_weights`), and their tokenizer + chat template.

Only safetensors and GGUF are read; nothing is downloaded and no pickle is ever opened.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from shoal.config import ModelConfig

    from .chat_template import ChatTemplateError, render_chat_template
    from .detokenizer import IncrementalDetokenizer
    from .gguf_file import GGUFRawTensor
    from .source import (
        DEFAULT_MODEL_PACKAGE,
        CheckpointError,
        ModelNotFound,
        ModelSource,
        default_model_path,
        resolve_model,
    )
    from .tokenizer import Tokenizer

# name → the submodule that defines it, imported on first use: `shoal.loader.chat_template` (what
# the template sandbox's worker processes load) must not pull torch, numpy and gguf in with it
_LAZY = {
    "ChatTemplateError": "chat_template", "render_chat_template": "chat_template",
    "IncrementalDetokenizer": "detokenizer", "GGUFRawTensor": "gguf_file",
    "DEFAULT_MODEL_PACKAGE": "source", "CheckpointError": "source", "ModelNotFound": "source",
    "ModelSource": "source", "default_model_path": "source", "resolve_model": "source",
    "Tokenizer": "tokenizer",
}

__all__ = [
    "DEFAULT_MODEL_PACKAGE", "CheckpointError", "ChatTemplateError", "GGUFRawTensor", "IncrementalDetokenizer",
    "ModelNotFound", "ModelSource", "Tokenizer", "default_model_path", "iter_gguf_raw", "iter_weights",
    "load_config", "load_generation_defaults", "render_chat_template", "resolve_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_config(src: ModelSource) -> ModelConfig:
    from .gguf_file import load_gguf_config
    from .safetensors_dir import load_hf_config

    if src.kind == "gguf":
        return load_gguf_config(src.path)
    return load_hf_config(src.path)


def iter_weights(src: ModelSource, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, one at a time. safetensors keep their stored dtype; GGUF tensors
    are dequantized to float32. Tied embeddings yield no `lm_head.weight`."""
    from .gguf_file import iter_gguf_weights
    from .safetensors_dir import iter_safetensors_weights

    if src.kind == "gguf":
        return iter_gguf_weights(src.path, config)
    return iter_safetensors_weights(src.path)


def iter_gguf_raw(src: ModelSource, config: ModelConfig | None = None) -> Iterator[tuple[str, GGUFRawTensor]]:
    from .gguf_file import iter_gguf_raw as _iter_gguf_raw

    if src.kind != "gguf":
        raise ValueError(f"iter_gguf_raw needs a GGUF source, got {src.kind} at {src.path}")
    return _iter_gguf_raw(src.path, config)


def load_generation_defaults(src: ModelSource) -> dict[str, Any]:
    """Sampling defaults the checkpoint suggests (generation_config.json); {} for GGUF."""
    from .safetensors_dir import load_hf_generation_defaults

    if src.kind == "hf_dir":
        return load_hf_generation_defaults(src.path)
    return {}
