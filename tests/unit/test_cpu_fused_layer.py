"""The CPU platform's whole-layer decode kernel (ops.cpp `dense_decode_layer`, reached through the
`dense_decoder_layer` op) against the same layer run op by op, and its all-layers call
(`dense_decode_stack`, through `dense_decoder_stack`) against the layers called one by one:
bit-identical outputs and caches on every decode batch of a generation (batch sizes 12 down to 1:
both the small-batch GEMV and the batched matmul ranges), for Llama and Qwen2 (q/k/v biases), int4
and int8 weights; a fused decode step is not compiled, and a compiled bf16 decode step built on the
fused call (compiled on request) gives the eager step's greedy tokens."""

from __future__ import annotations

import collections

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.backends import cpu
from shoal.backends.cpu import kernels
from tests.tiny import make_llama, make_qwen2

def _layer_of(llm: LLM):  # noqa: ANN202
    """spec → the model's layer it describes (by its K cache)."""
    layers = llm.engine.runner.model.model.layers
    return lambda spec: next(layer for layer in layers if layer.self_attn.attn.k_cache is spec.k_cache)


PROMPTS = [{"prompt_token_ids": [(7 * i + j) % 250 + 3 for j in range(3 + 5 * i)]} for i in range(12)]


# every test once per ISA tier this CPU has (tests/conftest.py `cpu_tier`)
pytestmark = pytest.mark.usefixtures("cpu_tier")


def _needs_kernels() -> None:
    """Skip on the generic tier (no SIMD GEMV or batched kernel); any other tier without them fails."""
    if not (kernels.torch_ops() and kernels.gemv_fast() and kernels.quant_gemm_supported(64, 64)):
        assert kernels.tier() == "generic" or not kernels.torch_ops(), f"the {kernels.tier()} tier lacks a kernel"
        pytest.skip("the fused layer needs the C++ operators, the SIMD GEMV and a batched kernel: not in the generic tier")


@pytest.mark.parametrize("maker,quant", [(make_llama, "int4"), (make_qwen2, "int4"), (make_llama, "int8")])
def test_fused_decode_layer_is_the_layer_op_by_op(tmp_path, monkeypatch, maker, quant):
    _needs_kernels()
    llm = LLM(str(maker(tmp_path / "m")), dtype="bfloat16", quantization=quant, enforce_eager=True, progress=False,
              max_num_seqs=16, num_blocks_override=64)
    fused, sizes, layer_of = cpu._fused_decode_layer, collections.Counter(), _layer_of(llm)

    def both(spec, x, residual, fb):  # noqa: ANN001, ANN202
        layer = layer_of(spec)
        paged = layer.self_attn.attn
        kc, vc = paged.k_cache.clone(), paged.v_cache.clone()
        got = fused(spec, x, residual, fb)
        if got is None:
            assert not fb.attn.decode_only, f"a {x.shape[0]}-row decode batch did not take the fused layer"
            return None
        kf, vf = paged.k_cache.clone(), paged.v_cache.clone()
        paged.k_cache.copy_(kc)
        paged.v_cache.copy_(vc)
        want = layer.forward_ops(x, residual, fb)
        for a, b in zip(got + (kf, vf), want + (paged.k_cache, paged.v_cache)):
            assert torch.equal(a, b)
        sizes[x.shape[0]] += 1
        return got

    monkeypatch.setattr(cpu, "_fused_decode_layer", both)
    monkeypatch.setattr(cpu, "_fused_decode_stack", lambda *a: None)  # layer by layer
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=2 + 2 * i, ignore_eos=True)
                                  for i in range(len(PROMPTS))])
    assert all(len(o.outputs[0].token_ids) == 2 + 2 * i for i, o in enumerate(outs))
    assert min(sizes) <= 8 < max(sizes), sizes  # both matmul kernels ran


@pytest.mark.parametrize("maker,quant", [(make_llama, "int4"), (make_qwen2, "int4"), (make_llama, "int8")])
def test_fused_decode_stack_is_the_layers_one_by_one(tmp_path, monkeypatch, maker, quant):
    _needs_kernels()
    # head size 32: the prompt attention kernel's smallest, so prompt and mixed steps fuse too
    llm = LLM(str(maker(tmp_path / "m", num_attention_heads=2, num_key_value_heads=1)), dtype="bfloat16",
              quantization=quant, enforce_eager=True, progress=False, max_num_seqs=16, num_blocks_override=64,
              max_num_batched_tokens=96)  # prompts in chunks beside decoding rows: mixed steps
    fused, sizes, layer_of = cpu._fused_decode_stack, collections.Counter(), _layer_of(llm)

    def one_by_one(stack, x, fb):  # noqa: ANN001, ANN202
        residual = None
        for spec in stack.layers:
            x, residual = layer_of(spec)(x, residual, fb, spec)
        return x, residual

    def both(stack, x, fb):  # noqa: ANN001, ANN202
        caches = [c for spec in stack.layers for c in (spec.k_cache, spec.v_cache)]
        before = [c.clone() for c in caches]
        got = fused(stack, x, fb)
        if got is None:
            assert not fb.attn.decode_only, f"a {x.shape[0]}-row decode batch did not take the fused stack"
            sizes["prompt declined"] += 1
            return None
        after = [c.clone() for c in caches]
        for c, b in zip(caches, before):
            c.copy_(b)
        want = one_by_one(stack, x, fb)  # each layer through dense_decode_layer (checked op by op above)
        for a, b in zip(got + tuple(after), want + tuple(caches)):
            assert torch.equal(a, b)
        sizes["decode" if fb.attn.decode_only else "prompt"] += 1
        qlens = fb.attn.query_lens_cpu
        if not fb.attn.decode_only and qlens.count(1) > 1:
            sizes["mixed, with one-token sequences"] += 1
        if fb.attn.decode_only:
            sizes[x.shape[0]] += 1
        return got

    monkeypatch.setattr(cpu, "_fused_decode_stack", both)
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=2 + 2 * i, ignore_eos=True)
                                  for i in range(len(PROMPTS))])
    assert all(len(o.outputs[0].token_ids) == 2 + 2 * i for i, o in enumerate(outs))
    rows = [k for k in sizes if isinstance(k, int)]
    assert min(rows) <= 8 < max(rows), sizes  # both matmul kernels ran
    # prompt and mixed steps too, where their projections take the VNNI tiles (no AMX)
    if cpu.int8_prompts() and kernels.prefill_attention_builtin():
        assert sizes["prompt"] > 0 and sizes["mixed, with one-token sequences"] > 0, sizes


def test_fused_layer_declines_what_it_does_not_cover(tmp_path, monkeypatch):
    """float32 activations and prompt batches run op by op (the op returns the unfused result)."""
    _needs_kernels()
    llm = LLM(str(make_llama(tmp_path / "m")), dtype="float32", quantization="int4", enforce_eager=True,
              progress=False, num_blocks_override=64)
    calls = collections.Counter()
    fused = cpu._fused_decode_layer

    def count(*a):  # noqa: ANN002, ANN202
        out = fused(*a)
        calls["fused" if out is not None else "op by op"] += 1
        return out

    stack = cpu._fused_decode_stack

    def count_stack(*a):  # noqa: ANN002, ANN202
        out = stack(*a)
        calls["stack" if out is not None else "layer by layer"] += 1
        return out

    monkeypatch.setattr(cpu, "_fused_decode_layer", count)
    monkeypatch.setattr(cpu, "_fused_decode_stack", count_stack)
    llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert calls["fused"] == 0 and calls["op by op"] > 0
    assert calls["stack"] == 0 and calls["layer by layer"] > 0
    assert not llm.engine.runner.platform.decode_fused(llm.engine.runner.model, 4)


def test_fused_decode_is_not_compiled(tmp_path):
    _needs_kernels()
    llm = LLM(str(make_llama(tmp_path / "m")), dtype="bfloat16", quantization="int4", enforce_eager=False,
              progress=False, max_num_seqs=12, num_blocks_override=64)
    runner = llm.engine.runner
    assert runner.platform.decode_fused(runner.model, 12)
    assert runner._compiled_decode is None
    # more rows than the fused call takes: compiled as before
    assert not runner.platform.decode_fused(runner.model, kernels.QUANT_GEMM_MAX_ROWS + 1)


def test_compiled_bf16_decode_on_the_fused_layer_matches_eager(tmp_path, monkeypatch):
    _needs_kernels()
    path = make_llama(tmp_path / "m")
    kw = dict(dtype="bfloat16", quantization="int4", progress=False, max_num_seqs=12, num_blocks_override=64)
    monkeypatch.setenv("SHOAL_COMPILE_FUSED", "1")  # the fused step is otherwise not compiled
    compiled = LLM(str(path), enforce_eager=False, **kw)
    assert compiled.engine.runner._compiled_decode is not None, "compile failed; see the warning in the log"
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in compiled.generate(PROMPTS[:10], params)]  # a batch of 10 padded to 12
    monkeypatch.setattr(cpu, "_fused_decode_layer", lambda *a: None)  # the eager reference, op by op
    monkeypatch.setattr(cpu, "_fused_decode_stack", lambda *a: None)
    eager = LLM(str(path), enforce_eager=True, **kw)
    assert got == [o.outputs[0].token_ids for o in eager.generate(PROMPTS[:10], params)]
