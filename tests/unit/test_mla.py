"""MLA: the naive (expand the latent per head) and absorbed (attend over the latent) forms agree on
random weights across prefill, chunked-prefill and decode batches; the cache holds exactly
kv_lora_rank + qk_rope_head_dim values per token per layer; model files name no device."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from shoal.config import ModelConfig
from shoal.layers.linear import ColumnParallelLinear
from shoal.layers.mla import MultiLatentAttention
from tests.parity.ds_utils import PagedHarness, make_deepseek, one_thread, shoal_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
H, C, N, R, V = 4, 32, 16, 8, 16
# the attention/cache fields of deepseek-ai/DeepSeek-V3's config.json
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "num_nextn_predict_layers": 1, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
}


def _layer(seed: int = 0) -> MultiLatentAttention:
    torch.manual_seed(seed)
    kv_b = ColumnParallelLinear(C, H * (N + V))
    kv_b.weight.data.normal_(0, 0.3)
    layer = MultiLatentAttention(H, C, N, R, V, scale=(N + R) ** -0.5, kv_b_proj=kv_b, mode="naive")
    layer.process_weights_after_loading()
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_naive_and_absorbed_agree():
    layer = _layer()
    h = PagedHarness(nn.ModuleList([layer]), num_seqs=4, max_len=96, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    steps = [
        {0: 1, 1: 7, 2: 33, 3: 50},  # prefill of mixed lengths
        {0: 3, 1: 1, 2: 16, 3: 5},  # chunked prefill / mixed with a decode row, over cached context
        {0: 1, 1: 1, 2: 1, 3: 1},  # decode only
    ]
    for new in steps:
        fb = h.batch({i: [0] * n for i, n in new.items()})
        t = fb.num_tokens
        q_nope, q_pe = torch.randn(t, H, N, generator=g), torch.randn(t, H, R, generator=g)
        c_kv, k_pe = torch.randn(t, C, generator=g), torch.randn(t, R, generator=g)
        naive = layer(q_nope, q_pe, c_kv, k_pe, fb.attn)  # stores the new latents, then attends
        absorbed = layer.forward_absorbed(q_nope, q_pe, fb.attn)
        assert naive.shape == (t, H, V)
        assert _rel(absorbed, naive) <= 1e-5, f"step {new}: relative error {_rel(absorbed, naive):.2e}"


def test_auto_mode_picks_absorbed_for_decode_and_naive_for_long_prefill():
    kv_b = ColumnParallelLinear(512, 128 * 256)  # DeepSeek-V3's shapes
    layer = MultiLatentAttention(128, 512, 128, 64, 128, scale=1.0, kv_b_proj=kv_b, mode="auto")
    h = PagedHarness(nn.ModuleList(), num_seqs=2, max_len=4096)
    assert layer.choose_mode(h.batch({0: [0] * 2048, 1: [0] * 1024}).attn) == "naive"
    assert layer.choose_mode(h.batch({0: [0], 1: [0]}).attn) == "absorbed"
    assert layer.choose_mode(h.batch({0: [0] * 4, 1: [0] * 2}).attn) == "absorbed"  # short chunks, long context


def test_cache_holds_only_latent_and_rope_key(tmp_path):
    layer = _layer()
    assert layer.kv_cache_spec() == {"kv": (C + R,)}
    for dtype in (torch.float32, torch.bfloat16):
        PagedHarness(nn.ModuleList([layer]), num_seqs=1, dtype=dtype)
        per_token_per_layer = layer.kv_cache[0, 0].numel() * layer.kv_cache.element_size()
        assert per_token_per_layer == (C + R) * torch.tensor([], dtype=dtype).element_size()
    # the published DeepSeek-V3 config: 61 layers × (512 + 64) × 2 bytes in bf16
    cfg = ModelConfig.from_hf_dict(DEEPSEEK_V3)
    assert cfg.kv_entries_per_token_per_layer == 576
    assert cfg.kv_bytes_per_token(2) == 61 * 576 * 2 == 70_272
    # a loaded model and the engine report the same figure (MTP blocks hold no cache by default)
    path = make_deepseek(tmp_path / "v3", "v3")
    model = shoal_model(path)
    assert model.kv_bytes_per_token(4) == 3 * (32 + 8) * 4 == model.config.kv_bytes_per_token(4)
    from shoal import LLM

    llm = LLM(str(path), dtype="float32", progress=False, block_size=16)
    assert llm.engine.runner.kv_bytes_per_token == 3 * (32 + 8) * 4


@pytest.mark.parametrize("rel", ["shoal/models/deepseek_v2.py", "shoal/layers/mla.py", "shoal/layers/moe.py",
                                 "shoal/loader/fp8.py"])
def test_model_files_name_no_device(rel):
    text = (ROOT / rel).read_text().lower()
    assert not re.search(r"cuda|\bnpu\b|torch_npu|ascend_|rocm|\bxpu\b|\bmps\b", text), rel
