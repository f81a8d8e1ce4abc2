"""DeepSeek FP8 block-scaled checkpoints.

Proves: block quantize → dequantize stays within e4m3 rounding (also for partial edge blocks); the
stream wrapper pairs `X.weight` with `X.weight_scale_inv` in either order and leaves other tensors
alone; a synthetic FP8 checkpoint (random transformers DeepSeek-V3 weights quantized the way
DeepSeek's format describes, 128×128 blocks) loads to weights within FP8 rounding of the originals,
and the model built from it gives the same greedy tokens as the model of the dequantized weights
(fp32: `transformers` on the dequantized checkpoint; bf16: shoal on DeepSeek's fp8→bf16 cast).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal import LLM, SamplingParams
from shoal.loader.fp8 import (
    FP8_DTYPE, dequantize_block_fp8, dequantize_fp8_stream, fp8_quantization_config, quantize_block_fp8,
    quantize_fp8_state_dict,
)
from tests.parity.ds_utils import (  # noqa: F401
    PagedHarness, first_near_tie, hf_greedy_logits, hf_model, make_deepseek, one_thread, shoal_model,
)
from tests.tiny import write_tokenizer


def _within_fp8_rounding(approx: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, block) -> bool:
    """|err| ≤ half an e4m3 step: 2^-4 relative for normals, 2^-10 · block scale for subnormals."""
    s = scale.repeat_interleave(block[0], 0)[: exact.shape[0]].repeat_interleave(block[1], 1)[:, : exact.shape[1]]
    bound = torch.maximum(exact.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)
    return bool(((approx - exact).abs() <= bound).all())


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((64, 40), (128, 128)), ((96, 80), (32, 16))])
def test_block_roundtrip_within_fp8_rounding(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])  # blocks of different ranges
    q, s = quantize_block_fp8(w, block)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1])) and s.dtype == torch.float32
    deq = dequantize_block_fp8(q, s, block)
    assert _within_fp8_rounding(deq, w, s, block)
    # each block's largest magnitude maps to the largest e4m3 value
    assert q.float().abs().max().item() == 448.0
    # dequantization is exactly fp8 × the block's scale
    i, j = shape[0] - 1, shape[1] - 1
    assert deq[i, j].item() == (q[i, j].float() * s[i // block[0], j // block[1]]).item()


def test_stream_pairs_weights_with_scales_in_either_order():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(130, 64, generator=g), torch.randn(64, 130, generator=g)
    qa, sa = quantize_block_fp8(a)
    qb, sb = quantize_block_fp8(b)
    norm = torch.ones(64)
    stream = [
        ("l.a.weight", qa), ("l.norm.weight", norm), ("l.a.weight_scale_inv", sa),  # weight first
        ("l.b.weight_scale_inv", sb), ("l.b.weight", qb.float()),  # scale first; weight already cast
    ]
    out = dict(dequantize_fp8_stream(stream))
    assert set(out) == {"l.a.weight", "l.norm.weight", "l.b.weight"}
    assert torch.equal(out["l.a.weight"], dequantize_block_fp8(qa, sa))
    assert torch.equal(out["l.b.weight"], dequantize_block_fp8(qb, sb))
    assert out["l.norm.weight"] is norm
    plain = [("x.weight", a), ("embed_tokens.weight", b)]  # nothing quantized: passes through
    assert {n: t for n, t in dequantize_fp8_stream(plain)} == {"x.weight": a, "embed_tokens.weight": b}
    with pytest.raises(ValueError, match="without its weight"):
        list(dequantize_fp8_stream([("y.weight_scale_inv", sa)]))
    with pytest.raises(ValueError, match="no 'z.weight_scale_inv'"):
        list(dequantize_fp8_stream([("z.weight", qa)]))


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """(original transformers checkpoint, its FP8 version, the FP8 weights dequantized to fp32)."""
    root = tmp_path_factory.mktemp("fp8")
    orig = make_deepseek(root / "orig", "v3", seed=3)
    sd = load_file(orig / "model.safetensors")
    cfg = json.loads((orig / "config.json").read_text())
    q = quantize_fp8_state_dict(sd)
    deq = dict(dequantize_fp8_stream(q.items()))
    for name, tensors, extra in (("fp8", q, {"quantization_config": fp8_quantization_config()}), ("deq", deq, {})):
        d = root / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        write_tokenizer(d, cfg["vocab_size"])
    return orig, root / "fp8", root / "deq", sd, q


def test_fp8_checkpoint_loads_within_rounding(fp8_ckpt):
    _, fp8_dir, _, sd, q = fp8_ckpt
    n_quantized = sum(1 for k in q if k.endswith("weight_scale_inv"))
    assert n_quantized >= 20 and q["model.layers.1.self_attn.kv_b_proj.weight"].dtype == FP8_DTYPE
    model = shoal_model(fp8_dir)
    layer = model.model.layers[1]
    pairs = {
        "model.layers.1.self_attn.kv_b_proj.weight": layer.self_attn.kv_b_proj.weight,
        "model.layers.1.self_attn.q_a_proj.weight": layer.self_attn.q_a_proj.weight,
        "model.layers.1.mlp.experts.3.gate_proj.weight": layer.mlp.experts.w13[3, :32],
        "model.layers.1.mlp.experts.3.down_proj.weight": layer.mlp.experts.w2[3],
        "model.layers.0.mlp.down_proj.weight": model.model.layers[0].mlp.down_proj.weight,
    }
    for name, param in pairs.items():
        assert not torch.equal(param, sd[name]), f"{name} was not quantized"
        assert _within_fp8_rounding(param.data, sd[name], q[name + "_scale_inv"], (128, 128)), name
    torch.testing.assert_close(layer.mlp.gate.weight.data, sd["model.layers.1.mlp.gate.weight"], rtol=0, atol=0)


def test_fp8_model_greedy_matches_dequantized_reference(fp8_ckpt):
    _, fp8_dir, deq_dir, _, _ = fp8_ckpt
    ref = hf_model(deq_dir)
    rng = random.Random(5)
    prompts = [[rng.randrange(8, 256) for _ in range(n)] for n in (3, 20, 45)]
    llm = LLM(str(fp8_dir), dtype="float32", progress=False, block_size=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for p, out in zip(prompts, outs):
        expect, rows = hf_greedy_logits(ref, p, 32)
        assert first_near_tie(rows) == 32, "reference has a near-tie: pick another prompt seed"
        assert list(out.outputs[0].token_ids) == expect, f"prompt len {len(p)}"


def test_fp8_model_matches_bf16_cast_checkpoint_in_bf16(fp8_ckpt, tmp_path):
    _, fp8_dir, _, _, q = fp8_ckpt
    # DeepSeek's fp8_cast_bf16: dequantize in fp32, store bf16
    # (only the FP8 tensors change; the rest, e.g. the float32 router, is kept as stored)
    bf16 = {k: (v.to(torch.bfloat16) if k + "_scale_inv" in q else v) for k, v in dequantize_fp8_stream(q.items())}
    fp8_model = shoal_model(fp8_dir, dtype=torch.bfloat16)
    bf16_model = shoal_model(fp8_dir, dtype=torch.bfloat16, weights=bf16.items(),
                             config=fp8_model.config.replace(quantization_config=None))
    rng = random.Random(6)
    prompts = [[rng.randrange(8, 256) for _ in range(n)] for n in (4, 30)]
    a, _ = PagedHarness(fp8_model, 2).greedy(prompts, 32)
    b, _ = PagedHarness(bf16_model, 2).greedy(prompts, 32)
    assert a == b
