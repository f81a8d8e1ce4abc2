"""shoal's C kernels for the CPU platform (shoal/backends/cpu/kernels.c) against their plain-torch
twins, on random inputs: decode attention over paged blocks (GQA/MHA, ragged lengths, scattered
blocks, a head size off the vector width), RMSNorm, rotary and SwiGLU (strided inputs, bf16 and
fp32), the custom op inside a compiled graph, and the fallback when no kernel library can be built.
"""

from __future__ import annotations

import pytest
import torch

from shoal.backends import native
from shoal.backends.cpu import kernels
from shoal.forward_batch import AttentionMetadata

# every test once per ISA tier this CPU has (tests/conftest.py `cpu_tier`)
pytestmark = [pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernels are not built here"),
              pytest.mark.usefixtures("cpu_tier")]


def _decode_case(b: int, hq: int, hkv: int, d: int, dv: int, dtype: torch.dtype, seed: int, bs: int = 16):
    g = torch.Generator().manual_seed(seed)
    nb = 64
    lens = torch.randint(1, 90, (b,), generator=g)
    lens[0] = 1  # a sequence with only its own token
    width = int((lens.max() + bs - 1) // bs)
    tables = torch.stack([torch.randperm(nb, generator=g)[:width] for _ in range(b)])  # scattered blocks
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, hkv, dv, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(b, dtype=torch.long), query_start_loc=torch.arange(b + 1), seq_lens=lens,
        block_tables=tables, query_lens_cpu=[1] * b, seq_lens_cpu=lens.tolist(), block_size=bs, max_query_len=1,
        max_seq_len=int(lens.max()),
    )
    return q, kc, vc, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,d,dv,bs", [
    (5, 9, 3, 64, 64, 16), (3, 4, 4, 64, 64, 16), (4, 16, 1, 32, 32, 16), (2, 10, 1, 40, 24, 16),
    (1, 3, 3, 64, 64, 16),
    # the bf16 paths: dot-product scores (D % 32 == 0, blocks of a multiple of 16 tokens) and the
    # row-wise weighted sum (DV 64 with ≤ 6 heads per KV head, DV 128 with ≤ 3), and their fallbacks
    (3, 6, 2, 128, 128, 16), (2, 6, 1, 128, 128, 32), (2, 8, 1, 64, 64, 16), (3, 9, 3, 64, 64, 8),
    (2, 4, 2, 96, 64, 48)])
def test_paged_decode_attention_matches_native(dtype, b, hq, hkv, d, dv, bs):
    q, kc, vc, meta = _decode_case(b, hq, hkv, d, dv, dtype, seed=b * 100 + hq, bs=bs)
    scale = d**-0.5
    got = torch.ops.shoal.paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, scale)
    ref = native.paged_attention(q.double(), kc.double(), vc.double(), meta, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (b, hq, dv)
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_is_the_same_on_any_number_of_threads(dtype):
    """The work split (worksplit.h: ranges balanced by sequence length, then taken from other threads'
    backs) decides only which thread computes an item: results are bit-identical with 1, 2, 3 and 7
    threads (7 on a 2-core machine: threads run unevenly, so ranges get taken)."""
    q, kc, vc, meta = _decode_case(29, 9, 3, 64, 64, dtype, seed=7)
    saved = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3, 7):
            torch.set_num_threads(nt)
            outs += [torch.ops.shoal.paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, 0.125)
                     for _ in range(3)]
    finally:
        torch.set_num_threads(saved)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=0, rtol=0)


def test_paged_decode_attention_in_a_compiled_graph():
    q, kc, vc, meta = _decode_case(4, 9, 3, 64, 64, torch.float32, seed=7)

    def f(q: torch.Tensor) -> torch.Tensor:
        return torch.ops.shoal.paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, 0.125) * 2

    eager = f(q)
    compiled = torch.compile(f, fullgraph=True)(q)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


@pytest.mark.parametrize("query_lens,contexts,hq,hkv,d,dv,bs", [
    ([5], [0], 9, 3, 64, 64, 16),                          # one short prompt
    ([16, 17, 140, 33], [0, 0, 0, 7], 9, 3, 64, 64, 16),   # tile-sized, ragged, a prefix
    ([1, 40, 1, 1, 64], [20, 30, 50, 3, 0], 9, 3, 64, 64, 16),  # mixed: decode rows and chunks
    ([300], [212], 4, 2, 128, 128, 32),                    # long context, D 128, 32-token blocks
    ([20, 9], [3, 0], 8, 8, 64, 64, 16),                   # MHA
    ([40], [0], 4, 2, 96, 80, 16),                         # D off 64, DV off 32
])
def test_cpu_prefill_attention_matches_native(query_lens, contexts, hq, hkv, d, dv, bs):
    """The CPU platform's attention for prefill and mixed batches (kernels.c prefill_attention_bf16 on
    AMX tiles or AVX512-BF16 where the CPU has them, else SDPA per request) against the native twin in
    float64."""
    from shoal.backends.cpu import paged_attention

    g = torch.Generator().manual_seed(sum(query_lens) + d)
    lens = [c + n for c, n in zip(contexts, query_lens)]
    width = max(-(-n // bs) for n in lens)
    nb = len(lens) * width + 3
    tables = torch.randperm(nb, generator=g)[: len(lens) * width].view(len(lens), width)  # scattered blocks
    kc = torch.randn(nb, bs, hkv, d, generator=g).bfloat16()
    vc = torch.randn(nb, bs, hkv, dv, generator=g).bfloat16()
    q = torch.randn(sum(query_lens), hq, d, generator=g).bfloat16()
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(q), dtype=torch.long), query_start_loc=torch.tensor(starts),
        seq_lens=torch.tensor(lens), block_tables=tables, query_lens_cpu=query_lens, seq_lens_cpu=lens,
        block_size=bs, max_query_len=max(query_lens), max_seq_len=max(lens))
    scale = d**-0.5
    out = torch.full((len(q), hq, dv), float("nan"), dtype=torch.bfloat16)
    prompts = [i for i, n in enumerate(query_lens) if n > 1]
    rows = torch.tensor(prompts)
    used = kernels.prefill_attention(q, kc, vc, tables[rows], meta.query_start_loc[rows],
                                     torch.tensor([query_lens[i] for i in prompts]), meta.seq_lens[rows], scale, out,
                                     any_tier=True)
    # the kernel is built into every tier (AMX tiles, AVX512-BF16 vdpbf16ps, AVX2 and portable C FMAs);
    # the platform runs it in place of SDPA on every tier but the generic one
    assert used and kernels.prefill_attention_builtin() == (kernels.tier() != "generic")
    got = paged_attention(q, kc, vc, meta, scale)
    ref = native.paged_attention(q.double(), kc.double(), vc.double(), meta, scale)
    torch.testing.assert_close(got.double(), ref, atol=1e-2, rtol=1e-2)
    if used:  # the kernel alone wrote every prompt row, and only those
        for i in range(len(query_lens)):
            sl = slice(starts[i], starts[i + 1])
            if query_lens[i] > 1:
                torch.testing.assert_close(out[sl].double(), ref[sl], atol=1e-2, rtol=1e-2)
            else:
                assert out[sl].isnan().all()


def test_cpu_prefill_attention_declines_what_it_does_not_cover():
    q = torch.randn(4, 2, 64)
    kc, vc = torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
    args = (torch.tensor([[0]]), torch.tensor([0]), torch.tensor([4]), torch.tensor([4]), 0.125)
    out = torch.zeros(4, 2, 64)
    assert not kernels.prefill_attention(q, kc, vc, *args, out)  # fp32: SDPA runs instead
    out = torch.zeros(4, 2, 40, dtype=torch.bfloat16)
    assert not kernels.prefill_attention(q.bfloat16(), kc.bfloat16(), vc[..., :40].bfloat16().contiguous(),
                                         *args, out)  # value rows of 40: not whole 16-column tiles
    assert (out == 0).all()


def _rot_inputs(t: int, heads: int, rot: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(t * 7 + heads)
    fused = torch.randn(t, heads * rot + 40, generator=g).to(dtype)  # q as a strided view of a fused qkv
    x = fused[:, : heads * rot].view(t, heads, rot)
    ang = torch.randint(0, 4096, (t, 1), generator=g).float() * (1e4 ** (-torch.arange(0, rot, 2).float() / rot))
    return x, ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 37])
def test_elementwise_kernels_match_native(dtype, t):
    g = torch.Generator().manual_seed(t)
    # RMSNorm on rows of a wider tensor (strided), widths on and off the vector width
    for h in (576, 40):
        x = (torch.randn(t, h + 24, generator=g) * 3).to(dtype)[:, :h]
        w = (1 + 0.5 * torch.randn(h, generator=g)).to(dtype)
        got, ref = kernels.rms_norm(x, w, 1e-5), native.rms_norm(x, w, 1e-5)
        assert got is not None
        torch.testing.assert_close(got, ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5)
        # the residual add fused in: the sum exactly the separate add's, the norm as above
        r = (torch.randn(t, h, generator=g) * 3).to(dtype)
        got2, ref2 = kernels.add_rms_norm(x, r, w, 1e-5), native.add_rms_norm(x, r, w, 1e-5)
        assert got2 is not None
        assert torch.equal(got2[1], ref2[1])
        torch.testing.assert_close(got2[0], ref2[0], atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    # rotary: same rounding as the torch form, so bf16 results are identical
    for heads, rot, inter in ((9, 64, False), (3, 64, True), (2, 8, True), (4, 10, False)):
        x, cos, sin = _rot_inputs(t, heads, rot, dtype)
        got, ref = kernels.rotary(x, cos, sin, inter), native.rotary(x, cos, sin, inter)
        assert got is not None
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    # SwiGLU (the kernel takes over above 8 rows)
    for inter in (1536, 37):
        x = (torch.randn(t, 2 * inter, generator=g) * 4).to(dtype)
        got = kernels.silu_and_mul(x)
        if t <= 8:
            assert got is None
            continue
        torch.testing.assert_close(got, native.silu_and_mul(x), atol=1e-5, rtol=1e-5)


def test_without_a_compiler_the_platform_runs_the_native_ops(monkeypatch):
    from shoal.backends import cpu

    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", True)
    x = torch.randn(20, 128)
    w = torch.randn(64)
    assert kernels.rms_norm(x[:, :64], w, 1e-6) is None and kernels.silu_and_mul(x) is None
    torch.testing.assert_close(cpu.rms_norm(x[:, :64], w, 1e-6), native.rms_norm(x[:, :64], w, 1e-6))
    torch.testing.assert_close(cpu.silu_and_mul(x), native.silu_and_mul(x))
    q, kc, vc, meta = _decode_case(3, 9, 3, 64, 64, torch.float32, seed=3)
    assert not kernels.decode_attention_supported(q, kc, vc)
    torch.testing.assert_close(cpu.paged_attention(q, kc, vc, meta, 0.125),
                               native.paged_attention(q, kc, vc, meta, 0.125), atol=1e-5, rtol=1e-5)


def test_compile_failure_is_reported_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING", logger="shoal"):
        assert kernels._compile() is None
    assert "CPU kernels are off" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_rows_match_the_torch_form(dtype):
    """kernels.c store_rows (eager prompt chunks): the same cache as index_copy_, for K/V that are
    strided views of a fused qkv projection, scattered slots; fewer rows or out-of-range slots are
    left to the torch form."""
    if kernels.library() is None:
        pytest.skip("the C kernels are not built here")
    from shoal.backends import cpu

    g = torch.Generator().manual_seed(3)
    cache = torch.randn(40, 16, 3, 64, generator=g).to(dtype)
    want = cache.clone()
    qkv = torch.randn(200, 960, generator=g).to(dtype)
    k = qkv[:, 576:768].view(200, 3, 64)
    slots = torch.randperm(640, generator=g)[:200]
    assert kernels.store_kv(cache, slots, k)
    native.store_kv(want, slots, k)
    assert torch.equal(cache, want)
    assert not kernels.store_kv(cache, slots[:10], k[:10])  # a decode step's rows: index_copy_
    assert not kernels.store_kv(cache, torch.full((200,), 640), k)  # out of range: the torch form raises
    with pytest.raises(IndexError):
        cpu.store_kv(cache, torch.full((200,), 640), k)
    cpu.store_kv(cache, slots.flip(0), k)  # through the platform op
    native.store_kv(want, slots.flip(0), k)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1, 7, 16, 49152 + 5])
def test_argmax_matches_torch_max(dtype, v):
    """Ties (the first wins), masked rows, NaN (its first index, as torch.max), a tail off the vector
    width and rows that are a view into a wider tensor."""
    g = torch.Generator().manual_seed(v)
    wide = torch.randn(6, v + 3, generator=g).to(dtype)
    x = wide[:, 1 : v + 1]  # rows v + 3 elements apart
    x[0, v // 2] = x[0, v - 1] = 30.0
    x[1] = float("-inf")
    x[2, : v - 1] = float("-inf")
    x[3, v // 3] = x[3, (2 * v) // 3] = float("nan")
    x[4] = 0.0  # all tied
    got = kernels.argmax(x)
    assert got is not None and got.dtype == torch.long
    assert torch.equal(got, native.argmax(x)), (got, native.argmax(x))
    assert torch.equal(kernels.argmax(x[:1]), native.argmax(x[:1]))
