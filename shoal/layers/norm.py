"""RMSNorm (the only norm the supported models use)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from shoal.backends import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual) in one platform op."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def pre_norm_block(
    x: torch.Tensor, residual: torch.Tensor | None, input_norm: RMSNorm,
    attn: Callable[[torch.Tensor], torch.Tensor], post_norm: RMSNorm, mlp: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm decoder layer, x += attn(norm(x)); x += mlp(norm(x)), with the residual stream
    carried beside the sublayer outputs so that each add runs inside the norm after it (the platform's
    `add_rms_norm`). x: the previous layer's MLP output, or the embeddings when residual is None.
    Returns this layer's MLP output and the residual stream before it; the model's final norm takes
    both."""
    if residual is None:
        residual, h = x, input_norm(x)
    else:
        h, residual = input_norm(x, residual)
    h, residual = post_norm(attn(h), residual)
    return mlp(h), residual
