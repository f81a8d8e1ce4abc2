"""Routing checkpoint tensors (Hugging Face names) into a model's modules.

A model declares `stacked_params`: (fused module name, checkpoint name, shard id) triples such as
("qkv_proj", "q_proj", "q"); every other tensor goes to the module that owns the parameter, via its
`load(name, tensor, shard_id)` when it has one (TP-aware layers) or a plain copy.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from shoal.errors import ShoalError
from shoal.layers.weight_names import route


class WeightLoadError(ShoalError, ValueError):
    pass


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params: list[tuple[str, str, str | int]] = (),  # type: ignore[assignment]
    skip: tuple[str, ...] = (),
) -> set[str]:
    """Load every tensor; return the set of model parameter names that received data."""
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        target, shard, mod_name, leaf = route(name, stacked_params)
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            raise WeightLoadError(f"checkpoint tensor {name!r} has no matching module in the model") from None
        with torch.no_grad():
            if hasattr(module, "load"):
                module.load(target, tensor, shard)
            else:
                p = getattr(module, leaf, None)
                if not isinstance(p, torch.Tensor):
                    raise WeightLoadError(f"checkpoint tensor {name!r} has no matching parameter in the model")
                if p.shape != tensor.shape:
                    raise WeightLoadError(
                        f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)} vs model {tuple(p.shape)}"
                    )
                p.data.copy_(tensor)
        loaded.add(target)
    return loaded


def check_all_loaded(model: nn.Module, loaded: set[str], optional: tuple[str, ...] = ()) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in loaded and not any(o in n for o in optional)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightLoadError(f"checkpoint is missing tensors for {missing[:5]}{more}")
