"""Weight-only quantization: formats, GGUF blocks, and the packed CPU kernels against their slow twin.

- quantize → dequantize stays within the format's rounding bound;
- GGUF Q4_0 / Q4_1 blocks load exactly (equal to the `gguf` package's dequantization), Q8_0 within
  half a step of the per-channel requantization;
- the CPU `quant_linear` (packed kernels for small batches, dense for large) equals the native op
  (dequantize + F.linear) on fresh random inputs, in float32 and bfloat16;
- `quantize_model` replaces every linear weight and shares a tied embedding with the LM head.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.backends import native
from shoal.backends.cpu import quant_linear as cpu_quant_linear
from shoal.layers.quant import Int4Weight, Int8Weight, from_gguf_blocks, pack_nibbles, unpack_nibbles


def _w(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def test_nibbles_roundtrip():
    q = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_int8_quantize_error_bound():
    w = _w(64, 96, 0)
    qw = Int8Weight.quantize(w)
    err = (qw.dequantize() - w).abs()
    assert (err <= qw.scales[:, None] / 2 + 1e-7).all()


def test_int4_quantize_error_bound():
    w = _w(64, 96, 1)
    qw = Int4Weight.quantize(w)
    err = (qw.dequantize() - w).abs()
    step = qw.scales.repeat_interleave(32, dim=1)
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = _w(48, 128, 2).numpy()
    t = GGMLQuantizationType[qtype]
    raw = quantize(w, t)  # uint8 [48, blocks * bytes]
    ref = torch.from_numpy(dequantize(raw, t).reshape(w.shape).astype(np.float32))
    qw = from_gguf_blocks(qtype, raw, w.shape)
    got = qw.dequantize()
    if qtype == "Q8_0":  # requantized per channel: within half a step of the row scale
        assert isinstance(qw, Int8Weight)
        assert ((got - ref).abs() <= qw.scales[:, None] / 2 + 1e-6).all()
    else:  # exact (up to float rounding of scale · code + zero)
        assert isinstance(qw, Int4Weight)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_cpu_quant_linear_matches_native(kind, dtype, rows):
    n, k = 96, 128
    w = _w(n, k, 3)
    qw = Int8Weight.quantize(w) if kind == "int8" else Int4Weight.quantize(w)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = cpu_quant_linear(x, qw, bias)
    ref = native.quant_linear(x.double(), qw, bias.double())  # dequantize in float64, exact matmul
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_cpu_quant_linear_3d_input():
    qw = Int4Weight.quantize(_w(64, 64, 4))
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(cpu_quant_linear(x, qw, None), native.quant_linear(x, qw, None), rtol=1e-4, atol=1e-4)


def test_embedding_rows_from_quantized_weight():
    for qw in (Int8Weight.quantize(_w(40, 64, 5)), Int4Weight.quantize(_w(40, 64, 6))):
        ids = torch.tensor([[0, 7], [39, 7]])
        torch.testing.assert_close(qw.embedding(ids, torch.float32), qw.dequantize()[ids])


def test_quantize_model_tiny_llama(tmp_path):
    from shoal import LLM, SamplingParams
    from shoal.layers.linear import LinearBase
    from tests.tiny import make_llama

    path = make_llama(tmp_path / "m", tie_word_embeddings=True)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = LLM(str(path), dtype="float32", progress=False, num_blocks_override=32, max_model_len=512)
    q = LLM(str(path), dtype="float32", quantization="int8", progress=False, num_blocks_override=32, max_model_len=512)
    model = q.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.quant is not None and m.weight is None for m in linears)
    assert model.lm_head.quant is model.model.embed_tokens.quant is not None
    a = ref.generate({"prompt_token_ids": [5, 9, 17, 33]}, sp)[0].outputs[0].token_ids
    b = q.generate({"prompt_token_ids": [5, 9, 17, 33]}, sp)[0].outputs[0].token_ids
    assert len(b) == 6 and a[0] == b[0]  # first token: int8 noise is far below the tiny model's margins
