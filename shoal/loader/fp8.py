"""DeepSeek's FP8 block-scaled checkpoints (`quantization_config.quant_method: fp8`, `fmt: e4m3`).

Each quantized linear weight `X.weight` is float8 e4m3 [out, in] and comes with
`X.weight_scale_inv` float32 [ceil(out/bo), ceil(in/bi)] for blocks of `weight_block_size`
[bo, bi] (128×128 in every published model). The scale is the one the weight was divided by when
quantized (block amax / 448), so dequantization is `w = fp8.float() * scale_inv` broadcast per
block. Embeddings, the LM head, the router (`mlp.gate.weight`) and norms stay unquantized.

`dequantize_fp8_stream` wraps the (name, tensor) stream a loader yields and emits each quantized
weight dequantized, once both halves of its pair have passed (in either order). The weight may
already have been cast from fp8 to a float dtype (exact: e4m3 fits in bf16); it is recognised by
its scale. `quantize_fp8_state_dict` makes such a checkpoint from float weights, for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def block_size_of(quantization_config: dict[str, Any] | None) -> tuple[int, int] | None:
    """The [bo, bi] block of a DeepSeek FP8 config, or None when the checkpoint is not FP8."""
    if not quantization_config or quantization_config.get("quant_method") != "fp8":
        return None
    fmt = quantization_config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"unsupported FP8 format {fmt!r} in quantization_config (shoal reads e4m3)")
    block = quantization_config.get("weight_block_size") or DEFAULT_BLOCK
    return int(block[0]), int(block[1])


def _expand_scale(scale_inv: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    out, inn = shape
    bo, bi = block
    want = (math.ceil(out / bo), math.ceil(inn / bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a [{out}, {inn}] weight "
            f"in {bo}x{bi} blocks"
        )
    s = scale_inv.float().repeat_interleave(bo, dim=0)[:out]
    return s.repeat_interleave(bi, dim=1)[:, :inn]


def dequantize_block_fp8(
    weight: torch.Tensor,  # [out, in] fp8 (or already cast to float)
    scale_inv: torch.Tensor,  # [ceil(out/bo), ceil(in/bi)]
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> torch.Tensor:  # [out, in] float32
    return weight.float() * _expand_scale(scale_inv, weight.shape, block)


def quantize_block_fp8(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:  # (fp8 [out, in], scale_inv float32 [ceil(out/bo), ceil(in/bi)])
    """DeepSeek's weight quantization: per block, scale = amax / 448 and q = e4m3(w / scale)."""
    out, inn = weight.shape
    bo, bi = block
    po, pi = math.ceil(out / bo) * bo, math.ceil(inn / bi) * bi
    w = torch.zeros(po, pi, dtype=torch.float32)
    w[:out, :inn] = weight.float()
    blocks = w.view(po // bo, bo, pi // bi, bi)
    amax = blocks.abs().amax(dim=(1, 3))  # [nbo, nbi]
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).view(po, pi)[:out, :inn].to(FP8_DTYPE)
    return q.contiguous(), scale


def default_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Which weights DeepSeek stores in FP8: 2-D linear weights except embeddings, LM heads and the router."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    skip = ("embed_tokens", "lm_head", "shared_head.head", ".gate.weight", "norm")
    return not any(s in name for s in skip)


def quantize_fp8_state_dict(
    state_dict: dict[str, torch.Tensor],
    block: tuple[int, int] = DEFAULT_BLOCK,
    quantizable: Callable[[str, torch.Tensor], bool] = default_quantizable,
) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` in DeepSeek's FP8 layout: quantized weights plus `*.weight_scale_inv`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if quantizable(name, t):
            q, s = quantize_block_fp8(t, block)
            out[name] = q
            out[name + SCALE_SUFFIX] = s
        else:
            out[name] = t
    return out


def fp8_quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, Any]:
    """The `quantization_config` DeepSeek's FP8 checkpoints carry in config.json."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def dequantize_fp8_stream(
    weights: Iterable[tuple[str, torch.Tensor]],
    block: tuple[int, int] = DEFAULT_BLOCK,
    quantizable: Callable[[str, torch.Tensor], bool] = default_quantizable,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of `weights`, with `X.weight` + `X.weight_scale_inv` pairs replaced by the
    dequantized float32 `X.weight`. A weight that may still meet its scale (fp8, or a float weight
    of a kind DeepSeek quantizes) is held until the scale arrives; whatever is left unpaired at the
    end passes through unchanged, and a scale without its weight is an error."""
    held_weights: dict[str, torch.Tensor] = {}
    held_scales: dict[str, torch.Tensor] = {}
    for name, t in weights:
        if name.endswith(SCALE_SUFFIX):
            wname = name[: -len(SCALE_SUFFIX)]
            if wname in held_weights:
                yield wname, dequantize_block_fp8(held_weights.pop(wname), t, block)
            else:
                held_scales[wname] = t
        elif name in held_scales:
            yield name, dequantize_block_fp8(t, held_scales.pop(name), block)
        elif t.dtype == FP8_DTYPE or (t.dim() == 2 and quantizable(name, t)):
            held_weights[name] = t
        else:
            yield name, t
    if held_scales:
        raise ValueError(f"FP8 checkpoint has weight_scale_inv without its weight: {sorted(held_scales)[:3]}")
    for name, t in held_weights.items():
        if t.dtype == FP8_DTYPE:
            raise ValueError(f"FP8 weight {name!r} has no {name + SCALE_SUFFIX!r} in the checkpoint")
        yield name, t
