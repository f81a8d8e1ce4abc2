"""shoal's quantized GEMV for decode on CPU (shoal/backends/cpu/qgemv.c): int8 activations per group of
32 against int4 (group-32, fp16 scale and offset) and int8 (per-channel) weights.

Checked against `kernels.quant_gemv_reference` (the same arithmetic in plain torch: exact up to fp32
summation order) and, loosely, against the dequantized float matmul; through the C++ operator, the
ctypes call, every ISA tier this CPU has (generic, avx2, avx512, amx), the CPU platform's `quant_linear`, and
a compiled graph with the C++ wrapper (the batch-1 decode step's configuration).
"""

from __future__ import annotations

import pytest
import torch

from shoal.backends import native
from shoal.backends.cpu import kernels
from shoal.layers.quant import Int4Weight, Int8Weight, unpack_nibbles

# every test once per ISA tier this CPU has (tests/conftest.py `cpu_tier`)
pytestmark = [pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernels are not built here"),
              pytest.mark.usefixtures("cpu_tier")]


def _skip_unless_ops() -> None:
    if not kernels.torch_ops():
        pytest.skip("the C++ torch operators are not built here")


def _skip_unless_simd(what: str = "qgemv.c's SIMD kernels or their torch operators") -> None:
    """Skip on the generic tier (scalar C only), where these kernels are not built; any other tier
    without them is a failure."""
    if not (kernels.gemv_fast() and kernels.torch_ops()):
        assert kernels.tier() == "generic" or not kernels.torch_ops(), f"{what} missing from the {kernels.tier()} tier"
        pytest.skip(f"{what}: not in the generic tier")


def _weights(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 5] += 0.4  # an outlier column, as real weights have
    return Int4Weight.quantize(w), Int8Weight.quantize(w)


def _int4_case(w4: Int4Weight):
    """(packed, kind, reference parts): the reference uses the fp16-rounded scale and offset the
    kernel stores."""
    packed = kernels.repack_int4(w4.codes, w4.scales, w4.zeros)
    assert packed is not None
    s = w4.scales.half().float().repeat_interleave(32, 1)
    m = (w4.zeros - 8 * w4.scales).half().float().repeat_interleave(32, 1)
    return packed, 4, (unpack_nibbles(w4.codes).float() * s, m)


def _int8_case(w8: Int8Weight):
    return kernels.repack_int8(w8.qweight, w8.scales), 8, (w8.dequantize(), None)


def _through_both_bindings(call):  # noqa: ANN001, ANN202
    """call() through the C++ operator (where it is built), then through ctypes: each result."""
    for cxx in ((True, False) if kernels.torch_ops() else (False,)):
        saved = kernels._cxx_ops
        kernels._cxx_ops = cxx
        try:
            yield call()
        finally:
            kernels._cxx_ops = saved


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + 8, generator=g) * 2
    x[:, 3] = 0.0
    if k >= 64:
        x[:, 32:64] = 0.0  # an all-zero group (scale 0)
    return x.to(dtype)[:, :k]  # rows strided (a view of a wider tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [4, 8])
@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (3, 130, 1536), (5, 64, 96), (9, 200, 64), (2, 70, 160),
                                   (9, 40, 2048)])  # the last: scratch on the heap
def test_quant_gemv_matches_its_reference(dtype, kind, m, n, k):
    w4, w8 = _weights(n, k, seed=n + k)
    packed, kind_, (scaled, offs) = _int4_case(w4) if kind == 4 else _int8_case(w8)
    x = _x(m, k, dtype, seed=m)
    for got in _through_both_bindings(lambda: kernels.quant_gemv(x, packed, kind_, n)):
        ref = kernels.quant_gemv_reference(x, scaled, offs)
        assert got.dtype == dtype and got.shape == (m, n)
        # fp32: summation order only; bf16: one rounding of the output
        scale = ref.abs().max().item()
        tol = (dict(atol=1e-5 * scale, rtol=1e-5) if dtype == torch.float32
               else dict(atol=1e-3 * scale, rtol=2**-8))  # bf16: half an ulp of the output
        torch.testing.assert_close(got.float(), ref, **tol)
        # and close to the float matmul on the dequantized weight (int8 activation rounding only)
        exact = x.float() @ (scaled + (0 if offs is None else offs)).T
        assert (got.float() - exact).norm() / exact.norm() < 0.02


def test_platform_quant_linear_uses_the_kernel_for_decode_rows():
    _skip_unless_simd()
    from shoal.backends import cpu

    w4, w8 = _weights(96, 576, seed=3)
    bias = torch.randn(96)
    for w in (w4, w8):
        x = _x(4, 576, torch.bfloat16, seed=4)
        got = cpu.quant_linear(x, w, bias)
        assert w.kernel_cache[("cpu", torch.bfloat16)][0] == "gemv"
        ref = native.quant_linear(x.float(), w, bias.float())
        assert (got.float() - ref).norm() / ref.norm() < 0.02


@pytest.mark.parametrize("kind", [4, 8])
def test_decode_rows_take_the_gemv_then_the_amx_kernel(kind):
    """quant_linear's decode rows (up to PACKED_MAX_ROWS) go through one operator, `quant_matmul`,
    which picks by rows: the VNNI GEMV up to GEMV_MAX_ROWS bf16 rows and for fp32, the AMX kernel for
    more bf16 rows where it runs (faster from 4 rows: it decodes the weight once, the GEMV re-reads it
    every 4 rows). Where the CPU has no AMX the weights are in the column layout and every row count
    takes quant_gemm_vnni (through either operator). Each row count gives exactly the numbers of the
    kernel that should run."""
    _skip_unless_simd()
    from shoal.backends import cpu

    w = _weights(96, 576, seed=21)[0 if kind == 4 else 1]
    for dtype in (torch.bfloat16, torch.float32):
        for rows in range(1, cpu.PACKED_MAX_ROWS + 1):
            x = _x(rows, 576, dtype, seed=rows).contiguous()
            got = cpu.quant_linear(x, w, None)
            form, kind_, packed = w.kernel_cache[("cpu", dtype)][:3]
            if form != "gemv":  # fp32 int4: torch's packed kernel
                assert dtype == torch.float32
                continue
            assert kind_ == (kind if kernels.amx_gemm() else kind | kernels.COLS)
            amx = dtype == torch.bfloat16 and rows > kernels.GEMV_MAX_ROWS and kernels.amx_gemm()
            op = torch.ops.shoal.quant_gemm if amx else torch.ops.shoal.quant_gemv
            torch.testing.assert_close(got, op(x, *packed, kind_, 96), atol=0, rtol=0)
            torch.testing.assert_close(got, torch.ops.shoal.quant_matmul(x, *packed, kind_, 96), atol=0, rtol=0)
            if kind_ & kernels.COLS and dtype == torch.bfloat16:
                torch.testing.assert_close(got, torch.ops.shoal.quant_gemm(x, *packed, kind_, 96), atol=0, rtol=0)


def test_repack_refuses_scales_outside_fp16():
    w4, _ = _weights(16, 64, seed=5)
    assert kernels.repack_int4(w4.codes, w4.scales * 1e6, w4.zeros) is None


def test_operators_in_a_compiled_graph_with_the_cpp_wrapper():
    """The batch-1 decode step's configuration: the C++ wrapper calls the C++-registered operators."""
    _skip_unless_ops()  # every tier has these kernels (the generic one in portable C)
    w4, _ = _weights(192, 576, seed=6)
    packed = kernels.repack_int4(w4.codes, w4.scales, w4.zeros)
    g = torch.Generator().manual_seed(8)
    kc, vc = torch.randn(8, 16, 3, 64, generator=g), torch.randn(8, 16, 3, 64, generator=g)
    tables, lens = torch.tensor([[5, 2, 7]]), torch.tensor([40])

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.shoal.quant_gemv(x * 2, packed[0], packed[1], packed[2], 4, 192)
        a = torch.ops.shoal.decode_attention(y.view(1, 3, 64), kc, vc, tables, lens, 0.125)
        return a + 1

    x = _x(1, 576, torch.float32, seed=9).contiguous()
    eager = f(x)
    q = torch.randn(2, 9, 64, generator=g)
    both = (torch.tensor([[5, 2, 7], [1, 0, 3]]), torch.tensor([40, 33]))
    torch.testing.assert_close(torch.ops.shoal.decode_attention(q, kc, vc, *both, 0.125),
                               torch.ops.shoal.paged_decode_attention(q, kc, vc, *both, 0.125), atol=0, rtol=0)
    compiled = torch.compile(f, fullgraph=True, options={"cpp_wrapper": True})(x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


@pytest.mark.parametrize("kind", [4, 8])
@pytest.mark.parametrize("m,n,k", [(9, 960, 576), (16, 64, 64), (32, 3072, 576), (33, 576, 1536), (64, 48, 160),
                                   (4, 96, 576), (81, 576, 1536), (96, 48, 160),
                                   (20, 16, 96), (40, 32, 224)])
def test_amx_quant_gemm_matches_the_dequantized_weight(kind, m, n, k):
    """qgemv.c quant_gemm_amx (batched decode, 4–96 rows): bf16 activations against the weight
    decoded to bf16 (int4: w = s·q + m rounded once; int8: q exactly, s applied to the output),
    fp32 accumulation. Reference: the same weight in a float64 matmul; the kernel's only further
    rounding is its bf16 output. K values cover one pair, pairs plus a 32-byte tail, and padding."""
    if not (kernels.amx_gemm() and kernels.quant_gemm_supported(n, k)):
        assert kernels.tier() != "amx" or not kernels.torch_ops() or n % 16 or k % 2
        pytest.skip("the AMX kernel does not run here (no AMX-BF16 or no torch operator)")
    packed, w = _amx_case(kind, n, k, seed=m + n)
    x = _x(m, k, torch.bfloat16, seed=k).contiguous()
    y = torch.ops.shoal.quant_gemm(x, *packed, kind, n)
    ref = x.double() @ w.T
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), ref, atol=2e-2 * ref.abs().max().item(), rtol=8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [4, 8])
@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (3, 64, 64), (8, 48, 96), (9, 16, 32), (32, 3072, 576),
                                   (33, 576, 1536), (17, 32, 192), (96, 80, 160), (130, 32, 224), (5, 16, 2048),
                                   (200, 48, 576), (61, 96, 1536)])
def test_vnni_quant_gemm_matches_its_reference(dtype, kind, m, n, k):
    """qgemv.c quant_gemm_vnni on the column layout (kernels.to_columns; the batched and the one-row
    kernel where the CPU has AVX512-VNNI but no AMX): the quantized-activation arithmetic of
    `quant_gemv_reference`, exact up to fp32 summation order. K values cover one pair, an odd last
    pair (int4's 32-byte tail), groups past K, and more activations than the stack scratch; rows
    cover one row, partial 8-row blocks, the 6-row × 2-block tiles (from 12 rows: partial tiles, an odd
    last column block, threads splitting columns or, from 48 rows, rows) and more than 96; through the
    C++ operators and ctypes."""
    _skip_unless_ops()  # every tier has these kernels (the generic one in portable C)
    w4, w8 = _weights(n, k, seed=n + k + m)
    packed, kind_, (scaled, offs) = _int4_case(w4) if kind == 4 else _int8_case(w8)
    cols, kc = kernels.to_columns(packed, kind_)
    assert kc == kind | kernels.COLS and cols[0].numel() == packed[0].numel()
    x = _x(m, k, dtype, seed=m + 1)
    ref = kernels.quant_gemv_reference(x, scaled, offs)
    scale = ref.abs().max().item()
    tol = (dict(atol=1e-5 * scale, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3 * scale, rtol=2**-8))
    for got in _through_both_bindings(lambda: kernels.quant_gemv(x, cols, kc, n)):
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got.float(), ref, **tol)
    if kernels.torch_ops() and dtype == torch.bfloat16:
        xc = x.contiguous()
        torch.testing.assert_close(torch.ops.shoal.quant_gemm(xc, *cols, kc, n), got, atol=0, rtol=0)
        torch.testing.assert_close(torch.ops.shoal.quant_matmul(xc, *cols, kc, n), got, atol=0, rtol=0)


@pytest.mark.parametrize("kind", [4, 8])
@pytest.mark.parametrize("m,n,k", [(1, 64, 96), (13, 3072, 576), (100, 96, 224), (7, 32, 1536)])
def test_vnni_glu_matches_its_reference(kind, m, n, k):
    """shoal::quant_gemm_glu (quant_gemm_vnni's tiles pairing gate block j with up block j + n/32, the
    activation in the epilogue): silu(g)·u of the kernel arithmetic's fp32 products, rounded to bf16
    once; and the platform's quant_linear_silu_mul routes prompt-sized rows to it."""
    _skip_unless_ops()  # every tier has these kernels (the generic one in portable C)
    w4, w8 = _weights(n, k, seed=n + k + m)
    packed, kind_, (scaled, offs) = _int4_case(w4) if kind == 4 else _int8_case(w8)
    cols, kc = kernels.to_columns(packed, kind_)
    x = _x(m, k, torch.bfloat16, seed=m + 3).contiguous()
    gu = kernels.quant_gemv_reference(x, scaled, offs)
    g, u = gu[:, : n // 2], gu[:, n // 2 :]
    ref = g / (1 + torch.exp(-g)) * u
    got = torch.ops.shoal.quant_gemm_glu(x, *cols, kc, n)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n // 2)
    torch.testing.assert_close(got.float(), ref, atol=1e-4 * ref.abs().max().item(), rtol=2**-8)
    from shoal.backends import cpu

    w = w4 if kind == 4 else w8
    if cpu.int8_prompts() and m > cpu.PACKED_MAX_ROWS:
        cpu._packed(w, torch.bfloat16)
        packed_w = w.kernel_cache[("cpu", torch.bfloat16)][2]
        torch.testing.assert_close(cpu.quant_linear_silu_mul(x, w, None),
                                   torch.ops.shoal.quant_gemm_glu(x, *packed_w, kc, n), atol=0, rtol=0)


@pytest.mark.parametrize("m", [40, 300])
def test_vnni_tiles_are_the_same_on_any_number_of_threads(m):
    """quant_gemm_vnni's tiles split work by worksplit.h (runs of row blocks for prompts, of column tiles
    for decode batches; a thread that runs out takes from another's back): which thread computes a
    tile must not change it. Bit-identical with 1, 2, 3 and 7 threads (7 on 2 cores: uneven)."""
    _skip_unless_ops()  # every tier has these kernels (the generic one in portable C)
    n, k = 1024, 320
    w4, _ = _weights(n, k, seed=m)
    packed, kind_, _ = _int4_case(w4)
    cols, kc = kernels.to_columns(packed, kind_)
    x = _x(m, k, torch.bfloat16, seed=m).contiguous()
    saved = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3, 7):
            torch.set_num_threads(nt)
            outs += [(torch.ops.shoal.quant_gemm(x, *cols, kc, n), torch.ops.shoal.quant_gemm_glu(x, *cols, kc, n))
                     for _ in range(2)]
    finally:
        torch.set_num_threads(saved)
    for y, glu in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], atol=0, rtol=0)
        torch.testing.assert_close(glu, outs[0][1], atol=0, rtol=0)


def test_bf16_prompt_activations_switch(monkeypatch):
    """SHOAL_CPU_PROMPT_ACTIVATIONS=bf16 (read at import: cpu._int8_prompts): prompt rows go to the dense
    bf16 matmul again, and SwiGLU's fused op falls back to quant_linear then silu_and_mul, bit for bit;
    a value other than int8 or bf16 is an error that names the variable."""
    from shoal.backends import cpu

    w4, _ = _weights(64, 576, seed=41)
    x = _x(200, 576, torch.bfloat16, seed=42)
    monkeypatch.setattr(cpu, "_int8_prompts", False)
    assert not cpu.int8_prompts()
    if not kernels.amx_gemm():  # with AMX, prompts take panel_gemm whatever the switch says
        torch.testing.assert_close(cpu.quant_linear(x, w4, None), cpu._dense_linear(x, w4, None), atol=0, rtol=0)
    torch.testing.assert_close(cpu.quant_linear_silu_mul(x, w4, None),
                               cpu.silu_and_mul(cpu.quant_linear(x, w4, None)), atol=0, rtol=0)
    monkeypatch.setenv("SHOAL_CPU_PROMPT_ACTIVATIONS", "BF16 ")
    assert cpu._prompt_activations_setting() is False
    monkeypatch.setenv("SHOAL_CPU_PROMPT_ACTIVATIONS", "fp8")
    with pytest.raises(ValueError, match="SHOAL_CPU_PROMPT_ACTIVATIONS must be int8 or bf16"):
        cpu._prompt_activations_setting()


def test_column_layout_is_the_row_layout_regrouped():
    """to_columns moves bytes, never changes them: int4 codes, scales and offsets, int8 bytes."""
    w4, w8 = _weights(48, 224, seed=31)  # int4: 3 pairs (a 64-byte block and a 32-byte tail)
    for packed, kind, _ in (_int4_case(w4), _int8_case(w8)):
        cols, kc = kernels.to_columns(packed, kind)
        for a, b in zip(packed, cols):
            assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
        # block 1's first vector: the first dword of rows 16..31
        first = packed[0].view(48, -1)[16:32, :4].flatten()
        assert torch.equal(cols[0][1, :64], first)
    with pytest.raises(AssertionError):
        kernels.to_columns(kernels.repack_int8(w8.qweight[:40], w8.scales[:40]), 8)


def _amx_case(kind: int, n: int, k: int, seed: int):
    """(packed weight, the bf16 weight the AMX kernels multiply by, in float64)."""
    w4, w8 = _weights(n, k, seed=seed)
    if kind == 4:
        packed, _, (scaled, offs) = _int4_case(w4)
        return packed, (scaled + offs).bfloat16().double()  # s·q + m in fp32, rounded to bf16
    packed, _, _ = _int8_case(w8)
    return packed, w8.qweight.double() * w8.scales.double()[:, None]


@pytest.mark.parametrize("kind", [4, 8])
@pytest.mark.parametrize("m,n,k", [(65, 960, 576), (100, 48, 1536), (129, 16, 64), (512, 576, 1536), (77, 32, 224),
                                   (96, 80, 160), (700, 64, 32)])
def test_panel_gemm_matches_the_dequantized_weight(kind, m, n, k):
    """qgemv.c quant_panels + panel_gemm (prompt rows): the weight decoded once into bf16 VNNI tiles
    (the same values as quant_gemm_amx's), activations in place, fp32 accumulation, int8's row scale
    on the output. Row tails, an odd number of 16-column blocks, a lone block, a K tail inside the last
    pair of groups, more rows than one L2 chunk (512 × 1536: chunks of 320 rows), and K 32."""
    if not kernels.panel_gemm_supported(n, k):
        assert kernels.tier() != "amx" or not kernels.torch_ops()
        pytest.skip("the AMX kernel does not run here (no AMX-BF16 or no torch operator)")
    packed, w = _amx_case(kind, n, k, seed=m + n)
    panels = torch.ops.shoal.quant_panels(*packed, kind, n, k)
    assert panels.shape == (n // 16, k // 32, 256)
    x = _x(m, k, torch.bfloat16, seed=k)  # rows strided
    y = torch.ops.shoal.panel_gemm(x, panels, packed[1] if kind == 8 else None, n)
    ref = x.double() @ w.T
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), ref, atol=2e-2 * ref.abs().max().item(), rtol=8e-3)


def test_platform_quant_linear_routes_by_rows():
    """bf16 rows: 9–96 through quant_gemm (AMX, else VNNI), 97..PANEL_GEMM_MAX_ROWS with K % 32 == 0
    through panel_gemm where the AMX kernels run, more rows (or K % 32 != 0) through the dense matmul;
    without AMX, every row count through the VNNI kernel unless SHOAL_CPU_PROMPT_ACTIVATIONS=bf16
    (without VNNI or the C++ operators: all through the dense matmul). All agree with the float64
    reference, int4 and int8 weights."""
    from shoal.backends import cpu

    bias = torch.randn(96)
    big = kernels.PANEL_GEMM_MAX_ROWS
    int8_k80 = Int8Weight.quantize(torch.randn(96, 80, generator=torch.Generator().manual_seed(12)) * 0.05)
    for k, ws in ((576, _weights(96, 576, seed=11)), (80, [int8_k80])):  # int4 needs K % 32 == 0
        for w in ws:
            for rows in (9, 64, 65, 96, 97, big + 1):
                x = _x(rows, k, torch.bfloat16, seed=rows)
                got = cpu.quant_linear(x, w, bias.bfloat16())
                ref = native.quant_linear(x.double(), w, bias.double())
                # the VNNI kernel rounds activations to int8 (the GEMV test's 2%); bf16 paths 1%
                vnni = ((rows <= kernels.QUANT_GEMM_MAX_ROWS or cpu.int8_prompts()) and not kernels.amx_gemm()
                        and kernels.quant_gemm_supported(96, k))
                assert (got.double() - ref).norm() / ref.norm() < (0.02 if vnni else 0.01)
            if not kernels.quant_gemm_supported(96, k):
                continue
            _, kind, packed = w.kernel_cache[("cpu", torch.bfloat16)]
            for rows in (32, 65, 96, 97, big, big + 1):  # the same numbers as the operator that should run
                x = _x(rows, k, torch.bfloat16, seed=3)
                if rows <= kernels.QUANT_GEMM_MAX_ROWS or cpu.int8_prompts():
                    want = torch.ops.shoal.quant_gemm(x.contiguous(), *packed, kind, 96)
                elif rows <= big and kernels.panel_gemm_supported(96, k):
                    panels = torch.ops.shoal.quant_panels(*packed, kind, 96, k)
                    want = torch.ops.shoal.panel_gemm(x, panels, packed[1] if kind == 8 else None, 96)
                else:
                    want = cpu._dense_linear(x, w, None)
                torch.testing.assert_close(cpu.quant_linear(x, w, None), want, atol=0, rtol=0)


def test_batched_quant_gemm_in_a_compiled_graph_with_the_cpp_wrapper():
    """The padded batched-decode step's configuration: the C++ wrapper calls shoal::quant_gemm (the AMX
    kernel or the VNNI one)."""
    if not kernels.quant_gemm_supported(192, 576):
        _skip_unless_simd("a batched kernel")
    w4, _ = _weights(192, 576, seed=12)
    packed, kind = kernels.repack_int4(w4.codes, w4.scales, w4.zeros), 4
    if not kernels.amx_gemm():  # the VNNI kernel's layout
        packed, kind = kernels.to_columns(packed, kind)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.shoal.quant_gemm(x * 2, packed[0], packed[1], packed[2], kind, 192) + 1

    x = _x(32, 576, torch.bfloat16, seed=13).contiguous()
    compiled = torch.compile(f, fullgraph=True, options={"cpp_wrapper": True})(x)
    torch.testing.assert_close(compiled, f(x), atol=0, rtol=0)


def test_start_up_builds_every_form_a_prompt_chunk_needs(tmp_path):
    """The warm-up runs a full prompt chunk, so a user's first long prompt builds no weight form
    (the CPU's AMX tiles, oneDNN's prepacked copies: ~0.8 s and ~370 MB with the default model)."""
    from shoal import LLM, SamplingParams
    from tests.tiny import make_llama

    llm = LLM(str(make_llama(tmp_path / "llama")), dtype="bfloat16", quantization="int4", enforce_eager=True,
              progress=False, num_blocks_override=160)
    weights = [m.quant for m in llm.engine.runner.model.modules() if getattr(m, "quant", None) is not None]
    assert weights
    forms = [set(w.kernel_cache) for w in weights]
    # two 900-token prompts: one 1,800-row chunk (oneDNN's range on the CPU), then the decode steps
    out = llm.generate([{"prompt_token_ids": [5 + i % 200 for i in range(900)]}] * 2,
                       SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 3 for o in out)
    assert [set(w.kernel_cache) for w in weights] == forms
