"""Rotary position embedding with the scalings the supported models use.

- default: inv_freq = base^(-2i/d)
- llama3 (Llama 3.1/3.3, R1-Distill-Llama): long wavelengths slowed by `factor`, smooth in between
- yarn (DeepSeek-V2/V3/R1): per-dimension blend of interpolation and extrapolation (a linear ramp
  between the beta_fast/beta_slow correction dims) and cos/sin scaled by
  mscale(factor, mscale) / mscale(factor, mscale_all_dim). The matching softmax-scale correction,
  mscale(factor, mscale_all_dim)², belongs to the attention (see `yarn_softmax_scale`).
"""

from __future__ import annotations

import json
import math
import weakref
from typing import Any

import torch
from torch import nn

from shoal.backends import ops


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale(head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """DeepSeek's attention scale: head_dim^-0.5, times mscale_all_dim² under YaRN."""
    scale = head_dim**-0.5
    if rope_scaling and rope_scaling.get("rope_type") == "yarn":
        m_all = rope_scaling.get("mscale_all_dim") or 0
        if m_all:
            m = yarn_get_mscale(float(rope_scaling["factor"]), float(m_all))
            scale = scale * m * m
    return scale


def _inv_freq_default(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _inv_freq_llama3(dim: int, base: float, rs: dict[str, Any]) -> torch.Tensor:
    inv = _inv_freq_default(dim, base)
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_len = float(rs["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _inv_freq_yarn(dim: int, base: float, rs: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = rs.get("factor")
    orig = float(rs["original_max_position_embeddings"])
    factor = float(factor) if factor is not None else max_pos / orig
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # computed in float32 like the reference, so parity holds to the last bit of the angle
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep_extra = 1 - ramp
    inv = inter * (1 - keep_extra) + extra * keep_extra
    if rs.get("attention_factor") is not None:
        attn_factor = float(rs["attention_factor"])
    else:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if m and m_all:
            attn_factor = yarn_get_mscale(factor, float(m)) / yarn_get_mscale(factor, float(m_all))
        else:
            attn_factor = yarn_get_mscale(factor)
    return inv, attn_factor


class _Tables:
    """cos/sin [max_position, rot/2] for one set of rotary parameters on one device."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        # eager steps: the last rows gathered, (positions, source cos, cos rows, sin rows), so a step's
        # layers (q and k each) gather once instead of twice a layer
        self.gathered: tuple | None = None


# every layer of a model rotates with the same parameters: one table for all of them (the default
# model's 30 layers held 60 MB of identical copies), alive while a layer holds it
_TABLES: weakref.WeakValueDictionary[tuple, _Tables] = weakref.WeakValueDictionary()


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin per position; `forward(positions, x)` rotates x [T, H, rot_dim]."""

    def __init__(
        self,
        rot_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.rot_dim = rot_dim
        self.interleaved = interleaved
        kind = (rope_scaling or {}).get("rope_type", "default")
        attn_factor = 1.0
        if kind == "default":
            inv = _inv_freq_default(rot_dim, base).float()
        elif kind == "llama3":
            inv = _inv_freq_llama3(rot_dim, base, rope_scaling).float()  # type: ignore[arg-type]
        elif kind == "yarn":
            inv, attn_factor = _inv_freq_yarn(rot_dim, base, rope_scaling, max_position)  # type: ignore[arg-type]
        elif kind == "linear":
            inv = _inv_freq_default(rot_dim, base).float() / float(rope_scaling["factor"])  # type: ignore[index]
        else:
            raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, yarn)")
        self.max_position = max_position
        t = torch.arange(max_position, dtype=torch.float32)
        key = (rot_dim, max_position, base, json.dumps(rope_scaling, sort_keys=True, default=str), str(t.device))
        tables = _TABLES.get(key)
        if tables is None:
            freqs = torch.outer(t, inv.float().to(t.device))  # [P, rot/2]
            tables = _TABLES[key] = _Tables(freqs.cos() * attn_factor, freqs.sin() * attn_factor)
        self._tables = tables
        self.register_buffer("cos", tables.cos, persistent=False)
        self.register_buffer("sin", tables.sin, persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self._rows(positions)
        return ops.rotary(x, cos, sin, self.interleaved)

    def _rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables' rows at `positions`. Eagerly, reused while the same positions tensor comes back
        against the same tables: every layer of a step, q and k (a 2,048-token prompt chunk: 120
        gathers of 256 KB → 2, ~7 ms of ~380). Identity is enough: the memo holds the tensor (its id
        cannot be reused) and nothing writes positions in place (each step builds its own; inference
        tensors have no version counter to check)."""
        if torch.compiler.is_compiling():
            return self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        g = self._tables.gathered
        if g is not None and g[0] is positions and g[1] is self.cos:
            return g[2], g[3]
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        self._tables.gathered = (positions, self.cos, cos, sin)
        return cos, sin
