"""Linear layers that know their tensor-parallel rank and size from the start (size 1 by default).

- ColumnParallelLinear: output features split across ranks (no communication).
- MergedColumnParallelLinear: several column layers fused into one matmul (gate+up), each shard
  split across ranks; checkpoint tensors are loaded into their slice with `shard_id`.
- QKVParallelLinear: q, k, v fused; kv heads split (or replicated when fewer than ranks).
- RowParallelLinear: input features split; partial sums all-reduced.
- ReplicatedLinear: the whole matrix on every rank.

Every layer computes through `ops.linear`, so a platform (or a quantization method that replaces
`self.weight` with packed data, see layers/quant.py) can substitute its own kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends import ops
from shoal.distributed import tp_all_reduce, tp_group
from shoal.layers.activation import silu_and_mul


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.quant = None  # a layers.quant.QuantizedWeight once quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.matmul(x, self.bias)
        return ops.linear(x, self.weight, self.bias)

    def load(self, name: str, tensor: torch.Tensor, shard_id: str | int | None = None) -> None:
        """Copy one checkpoint tensor (`name` ends in weight or bias) into this rank's part."""
        raise NotImplementedError


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch loading {what}: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")
    dst.copy_(src)


class ReplicatedLinear(LinearBase):
    def load(self, name: str, tensor: torch.Tensor, shard_id: str | int | None = None) -> None:
        param = self.bias if name.endswith("bias") else self.weight
        _copy(param.data, tensor, name)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.tp = tp_group()
        if out_features % self.tp.size:
            raise ValueError(f"output size {out_features} not divisible by tensor-parallel size {self.tp.size}")
        super().__init__(in_features, out_features // self.tp.size, bias)

    def load(self, name: str, tensor: torch.Tensor, shard_id: str | int | None = None) -> None:
        param = self.bias if name.endswith("bias") else self.weight
        n = param.shape[0]
        _copy(param.data, tensor.narrow(0, self.tp.rank * n, n), name)


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = [s // self.tp.size for s in output_sizes]

    def load(self, name: str, tensor: torch.Tensor, shard_id: str | int | None = None) -> None:
        assert isinstance(shard_id, int), "merged linear needs an integer shard id"
        param = self.bias if name.endswith("bias") else self.weight
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        _copy(param.data.narrow(0, offset, size), tensor.narrow(0, self.tp.rank * size, size), name)


    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu_and_mul of this layer's output, for a gate_up projection (the gate's outputs, then the
        up's): one op when the weight is quantized (`quant_linear_silu_mul`, which a platform may fuse)."""
        if self.quant is not None:
            return ops.quant_linear_silu_mul(x, self.quant, self.bias)
        return silu_and_mul(self(x))


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        tp = tp_group()
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        self.head_dim = head_dim
        total = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, total, bias)

    def load(self, name: str, tensor: torch.Tensor, shard_id: str | int | None = None) -> None:
        param = self.bias if name.endswith("bias") else self.weight
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]  # type: ignore[index]
        rank = self.tp.rank if shard_id == "q" else self.tp.rank // self.kv_replicas
        _copy(param.data.narrow(0, offset, size), tensor.narrow(0, rank * size, size), name)


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce: bool = True) -> None:
        self.tp = tp_group()
        if in_features % self.tp.size:
            raise ValueError(f"input size {in_features} not divisible by tensor-parallel size {self.tp.size}")
        super().__init__(in_features // self.tp.size, out_features, bias)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant.matmul(x, None) if self.quant is not None else ops.linear(x, self.weight, None)
        if self.reduce:
            y = tp_all_reduce(y)
        return y if self.bias is None else y + self.bias

    def load(self, name: str, tensor: torch.Tensor, shard_id: str | int | None = None) -> None:
        if name.endswith("bias"):
            _copy(self.bias.data, tensor, name)  # type: ignore[union-attr]
            return
        n = self.weight.shape[1]
        _copy(self.weight.data, tensor.narrow(1, self.tp.rank * n, n), name)
