"""Where a checkpoint tensor goes: fused projections (qkv, gate+up) take their parts by shard id."""

from __future__ import annotations

StackedParams = list[tuple[str, str, str | int]]


def route(name: str, stacked_params: StackedParams) -> tuple[str, str | int | None, str, str]:
    """Checkpoint name → (model parameter name, shard id, owning module name, leaf attribute)."""
    target, shard = name, None
    for fused, part, shard_id in stacked_params:
        if f".{part}." in name:
            target, shard = name.replace(f".{part}.", f".{fused}."), shard_id
            break
    mod_name, _, leaf = target.rpartition(".")
    return target, shard, mod_name, leaf
