"""Process groups for tensor/expert parallelism over torch.distributed (gloo/nccl/hccl).

World size 1 needs no process group: every collective is the identity, so models are written
TP-aware from the start and single-device serving pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class GroupInfo:
    rank: int = 0
    size: int = 1


_TP = GroupInfo()


def tp_group() -> GroupInfo:
    return _TP


def set_tp_group(rank: int, size: int) -> None:
    """Called once per process after torch.distributed.init_process_group (see launch code)."""
    global _TP
    _TP = GroupInfo(rank, size)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    torch.distributed.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
