"""Result rows, per-dtype tolerances and the error measure the op checks share.

Error measure: max over elements of |got - ref| / (|ref| + rms(ref)). It is a relative error
for large elements and an error relative to the tensor's typical size for small ones, so one
tolerance per dtype fits every op: near-zero outputs of a matmul or an attention mix are not
held to an impossible relative bound, and a wrong op (missing weight, wrong mask, swapped rotary
halves) lands far above it (≥ 0.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# scaled max error allowed, per tested dtype. An input is first rounded to the tested dtype and
# the reference sees the same rounded values, so these bound the op's own arithmetic only.
TOLERANCES = {
    "float32": 1e-4,
    "float16": 6e-3,
    "bfloat16": 4e-2,
}
# quantized linear layers in bf16 may round their activations to int8 per group of 32 (scale amax/127),
# as llama.cpp's CPU kernels and shoal's VNNI kernels do: an element's rounding is up to amax/254 of its
# group, so the output error runs about twice bf16's. Measured with shoal's CPU kernels over 12 seeds
# of this suite's cases: up to 0.048; a wrong kernel lands at 0.1 and more.
QUANT_LINEAR_TOLERANCES = {"bfloat16": 8e-2}
# quant_linear_silu_mul: silu(gate)·up carries both projections' rounding; measured up to 0.07 over 11
# seeds (shoal's VNNI kernel with the activation in its epilogue); swapped halves land at 0.5 and more
QUANT_GLU_TOLERANCES = {"bfloat16": 1.2e-1}
# the float64 native reference against the independent oracle (same maths, other code)
ORACLE_TOLERANCE = 1e-9

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class CaseResult:
    op: str
    case: str  # which model shape / batch layout
    dtype: str
    impl: str  # "native" or the override's qualified name
    status: str  # pass | fail | error | skip
    error: float | None = None  # scaled max error (see module docstring)
    tol: float | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scaled_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / (|ref| + rms(ref)), in float64 on the CPU; inf on shape or NaN trouble."""
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return float("inf")
    rms = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return float(((got - ref).abs() / (ref.abs() + rms)).max())


def judge(op: str, case: str, dtype: str, impl: str, got: torch.Tensor, ref: torch.Tensor,
          tol: float, oracle_err: float | None = None, expect_dtype: torch.dtype | None = None) -> CaseResult:
    """One result row: the candidate vs the float64 reference, plus the reference vs its oracle."""
    if tuple(got.shape) != tuple(ref.shape):
        return CaseResult(op, case, dtype, impl, "fail", None, tol,
                          f"output shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if expect_dtype is not None and got.dtype != expect_dtype:
        return CaseResult(op, case, dtype, impl, "fail", None, tol,
                          f"output dtype {dtype_name(got.dtype)}, expected {dtype_name(expect_dtype)}")
    err = scaled_error(got, ref)
    detail = ""
    status = "pass" if err <= tol else "fail"
    if err == float("inf"):
        detail = "non-finite output"
    if oracle_err is not None:
        detail = (detail + "; " if detail else "") + f"reference vs oracle {oracle_err:.1e}"
        if oracle_err > ORACLE_TOLERANCE:
            status = "fail"
            detail += " (the float64 native reference disagrees with the independent oracle)"
    return CaseResult(op, case, dtype, impl, status, err, tol, detail)
