"""SwiGLU: silu(gate) * up on a fused [.., 2I] projection (the platform op `silu_and_mul`)."""

from __future__ import annotations

import torch

from shoal.backends import ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return ops.silu_and_mul(x)
