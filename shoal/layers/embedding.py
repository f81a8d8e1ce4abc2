"""Vocabulary-parallel embedding and LM head (vocab rows split across tensor-parallel ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoal.backends import ops
from shoal.distributed import tp_all_gather, tp_all_reduce, tp_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = tp_group()
        self.vocab_size = vocab_size
        self.per_rank = (vocab_size + self.tp.size - 1) // self.tp.size
        self.start = self.tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)
        self.quant = None  # a layers.quant.QuantizedWeight (e.g. tied to a quantized LM head)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and self.tp.size == 1:
            return self.quant.embedding(ids, self.quant_dtype)
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.per_rank)
        y = F.embedding(local.masked_fill(mask, 0), self.weight)
        y = y.masked_fill(mask.unsqueeze(-1), 0)
        return tp_all_reduce(y)

    def load(self, name: str, tensor: torch.Tensor, shard_id: str | int | None = None) -> None:
        rows = tensor[self.start : self.start + self.per_rank]
        self.weight.data.zero_()
        self.weight.data[: rows.shape[0]].copy_(rows)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocab slice, gathered to the full vocabulary."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            logits = self.quant.matmul(hidden, None)
        else:
            logits = ops.linear(hidden, self.weight, None)
        logits = tp_all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
