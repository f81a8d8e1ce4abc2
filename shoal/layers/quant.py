"""Weight-only quantized linear weights: the formats, quantizing float weights at load, and loading
GGUF quantization blocks straight into them (never inflated to float).

Formats (the canonical, device-neutral form; a platform may repack it for its kernel):

- `Int8Weight`, per output channel, symmetric: w[n, k] = q[n, k] · scale[n], q int8 [N, K].
- `Int4Weight`, group-wise along K, asymmetric: w[n, k] = (q[n, k] − 8) · scale[n, g] + zero[n, g]
  with q ∈ 0..15 and g = k // group_size. Codes are stored two per byte, [N, K/2] uint8 (even k in
  the low nibble). This is exactly the form of torch's packed int4 kernels' "scales and zeros".

Compute goes through the platform op `quant_linear(x, qweight, bias)`: its native form dequantizes
(`qweight.dequantize(x.dtype)`) and calls F.linear — the slow twin every packed kernel is tested
against; a platform override runs a packed kernel (the CPU one repacks once, on first use).

GGUF blocks (32 weights along a row each):
- Q4_0 (d, 16 bytes of nibbles): w = d · (q − 8) → Int4, scale = d, zero = 0. Exact.
- Q4_1 (d, m, nibbles): w = d · q + m → Int4, scale = d, zero = m + 8d. Exact.
- Q8_0 (d, 32 int8): per-32 scales that a per-channel int8 kernel cannot express. We requantize
  to per-channel Int8 (q' = round(d·q / s), s = row amax / 127); the added error is at most half a
  step of the row's scale — the same order as Q8_0's own rounding. (The alternative, an exact
  split into two int4 matmuls, reads 1.5× the bytes; measured slower at batch 1.)
- anything else (K-quants, F16, …): dequantized with the `gguf` package, then quantized like a
  float checkpoint (int4 for `--quantization int4`, else int8).
Packed kernels want the activations in the platform's fast dtype (bf16 here); the model runner
loads GGUF blocks packed only then, and dequantizes them for float32 compute (the exact reference).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.backends import ops

GROUP_SIZE = 32
GGUF_PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")


class QuantizedWeight(nn.Module):
    """A quantized [N, K] weight. Lives in a linear layer's `quant` slot (an nn.Module so that
    `.to()`, `state_dict` and compile see its tensors)."""

    out_features: int
    in_features: int

    def __init__(self) -> None:
        super().__init__()
        self.kernel_cache: dict[Any, Any] = {}  # platform-packed forms (keyed by the platform)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the dequantized weight (for a tied embedding): [*ids.shape, K]."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.quant_linear(x, self, bias)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}"


class Int8Weight(QuantizedWeight):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        assert qweight.dtype == torch.int8 and qweight.dim() == 2 and scales.shape == qweight.shape[:1]
        self.register_buffer("qweight", qweight.contiguous())  # [N, K] int8
        self.register_buffer("scales", scales.float().contiguous())  # [N]
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int8Weight":
        w = w.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).float()
        return (rows * F.embedding(ids, self.scales[:, None])).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 per-channel"


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 → [N, K/2] uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 → codes [N, K] uint8."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


class Int4Weight(QuantizedWeight):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        n, half_k = codes.shape
        assert codes.dtype == torch.uint8 and scales.shape == zeros.shape == (n, 2 * half_k // group_size)
        self.register_buffer("codes", codes.contiguous())  # [N, K/2] uint8
        self.register_buffer("scales", scales.float().contiguous())  # [N, K/G]
        self.register_buffer("zeros", zeros.float().contiguous())  # [N, K/G]
        self.group_size = group_size
        self.out_features, self.in_features = n, 2 * half_k

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = GROUP_SIZE) -> "Int4Weight":
        """Min-max asymmetric 4-bit per group of `group_size` along K."""
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"int4 needs in_features ({k}) divisible by the group size {group_size}")
        g = w.float().reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / 15.0).clamp(min=1e-10)
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).reshape(n, k)
        return cls(pack_nibbles(q), scales, lo + 8 * scales, group_size)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_nibbles(self.codes).float()
        return ((q - 8) * self._expand(self.scales) + self._expand(self.zeros)).to(dtype)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_nibbles(F.embedding(ids, self.codes)).float()
        s, z = F.embedding(ids, self.scales), F.embedding(ids, self.zeros)
        return ((q - 8) * self._expand(s) + self._expand(z)).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int4 group {self.group_size}"


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights of one format along N (fused qkv / gate+up)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if all(isinstance(p, Int8Weight) for p in parts):
        return Int8Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
    if all(isinstance(p, Int4Weight) and p.group_size == first.group_size for p in parts):
        return Int4Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                          torch.cat([p.zeros for p in parts]), first.group_size)
    # mixed formats (e.g. a GGUF with Q4_1 q and Q8_0 v): requantize the whole to int8
    return Int8Weight.quantize(torch.cat([p.dequantize() for p in parts]))


# ----------------------------------------------------------------------------- quantize float models


def _quantizable(m: nn.Module) -> bool:
    from shoal.layers.embedding import ParallelLMHead
    from shoal.layers.linear import LinearBase

    return isinstance(m, (LinearBase, ParallelLMHead)) and getattr(m, "quant", None) is None \
        and isinstance(getattr(m, "weight", None), torch.Tensor)


def attach(module: nn.Module, qw: QuantizedWeight) -> None:
    """Put qw in the module's `quant` slot and drop its float weight."""
    w = getattr(module, "weight", None)
    module.quant_dtype = w.dtype if isinstance(w, torch.Tensor) else torch.get_default_dtype()
    module.quant = qw
    module.register_parameter("weight", None)


def quantize_tensor(w: torch.Tensor, method: str) -> QuantizedWeight:
    if method == "int8":
        return Int8Weight.quantize(w)
    if method == "int4":
        if w.shape[1] % GROUP_SIZE:
            return Int8Weight.quantize(w)
        return Int4Weight.quantize(w)
    raise ValueError(f"unknown quantization {method!r}; choose one of none, int8, int4")


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize every float linear layer (and the LM head) of a loaded model in place.

    int4 keeps the LM head in int8 (as llama.cpp's Q4 files keep `output` at 6–8 bits: the logits
    are the most sensitive matmul). A tied input embedding then reads its rows from the same
    quantized weight, so no float copy of the vocabulary matrix is kept."""
    from shoal.layers.embedding import ParallelLMHead, VocabParallelEmbedding

    if method not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {method!r}; choose one of none, int8, int4")
    embeddings = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    for m in list(model.modules()):
        if not _quantizable(m):
            continue
        is_head = isinstance(m, ParallelLMHead)
        w = m.weight.data
        if is_head:
            w = w[: m.vocab_size] if m.tp.size == 1 else w
        qw = quantize_tensor(w, "int8" if is_head else method)
        tied = [e for e in embeddings if is_head and e.weight is m.weight]
        attach(m, qw)
        for e in tied:
            attach(e, qw)
    return model


# ----------------------------------------------------------------------------- GGUF blocks


def _f16(blocks: np.ndarray, start: int) -> torch.Tensor:
    """fp16 field at byte `start` of every block → float32 tensor [N, G]."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]
                            .astype(np.float32))


def _nibbles_gguf(qs: np.ndarray) -> torch.Tensor:
    """GGUF 4-bit block bytes [N, G, 16] (element j low nibble of byte j, j+16 high) → codes [N, K]."""
    qs = torch.from_numpy(np.ascontiguousarray(qs))
    codes = torch.cat((qs & 15, qs >> 4), dim=-1)  # [N, G, 32] in element order
    return codes.reshape(qs.shape[0], -1)


def from_gguf_blocks(qtype: str, data: np.ndarray, shape: tuple[int, ...]) -> QuantizedWeight:
    """GGUF Q4_0 / Q4_1 / Q8_0 row blocks (uint8 [N, G * block_bytes]) → a QuantizedWeight."""
    n, k = shape
    groups = k // 32
    if qtype == "Q4_0":
        b = data.reshape(n, groups, 18)
        d = _f16(b, 0)
        return Int4Weight(pack_nibbles(_nibbles_gguf(b[..., 2:])), d, torch.zeros_like(d))
    if qtype == "Q4_1":
        b = data.reshape(n, groups, 20)
        d, m = _f16(b, 0), _f16(b, 2)
        return Int4Weight(pack_nibbles(_nibbles_gguf(b[..., 4:])), d, m + 8 * d)
    if qtype == "Q8_0":
        b = data.reshape(n, groups, 34)
        d = _f16(b, 0)
        q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32))
        return Int8Weight.quantize((q * d[..., None]).reshape(n, k))
    raise ValueError(f"GGUF type {qtype} has no direct packed form (supported: {', '.join(GGUF_PACKED_TYPES)})")


def load_gguf_packed(model: nn.Module, raw: Iterable[tuple[str, Any]], stacked_params: list[tuple[str, str, Any]],
                     method: str = "none") -> Iterator[tuple[str, torch.Tensor]]:
    """Consume `iter_gguf_raw` pairs: weights of linear layers (and a tied embedding / LM head)
    stored as Q4_0/Q4_1/Q8_0 go straight into the modules' `quant` slots; every other tensor is
    dequantized and yielded as (HF name, float32 tensor) for the model's own `load_weights`.

    Fused layers (qkv, gate+up) are assembled once all their parts have arrived. Tensor
    parallelism > 1 is not handled here (the caller dequantizes instead)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from shoal.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from shoal.layers.linear import LinearBase
    from shoal.layers.weight_names import route

    pending: dict[str, dict[Any, QuantizedWeight]] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, t in raw:
        target, shard, mod_name, leaf = route(name, stacked_params)
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            module = None
        is_linear = isinstance(module, (LinearBase, ParallelLMHead)) and leaf == "weight"
        is_tied_emb = tied and isinstance(module, VocabParallelEmbedding) and leaf == "weight"
        if not (is_linear or is_tied_emb) or t.qtype not in GGUF_PACKED_TYPES or len(t.shape) != 2:
            arr = np.array(t.data, dtype=np.float32, copy=True) if t.qtype == "F32" else \
                dequantize(np.asarray(t.data), GGMLQuantizationType[t.qtype])
            yield name, torch.from_numpy(np.ascontiguousarray(arr.reshape(t.shape), dtype=np.float32))
            continue
        qw = from_gguf_blocks(t.qtype, t.data, t.shape)
        if method == "int8" and isinstance(qw, Int4Weight):
            qw = Int8Weight.quantize(qw.dequantize())
        if shard is None:
            attach(module, qw)
            if is_tied_emb:
                attach(model.lm_head, qw)  # type: ignore[union-attr]
            continue
        parts = pending.setdefault(mod_name, {})
        parts[shard] = qw
        order = [sid for fused, _, sid in stacked_params if mod_name.endswith(fused)]
        if all(sid in parts for sid in order):
            attach(module, cat_rows([parts[sid] for sid in order]))
            del pending[mod_name]
    if pending:
        raise ValueError(f"GGUF is missing parts of fused layers: {sorted(pending)}")
