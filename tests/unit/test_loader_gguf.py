"""GGUF: config from metadata, tensor names, dequantization and llama's q/k un-permutation.

Synthetic files are written with `gguf.GGUFWriter` from tiny random transformers models, so the
expected weights are known exactly; K-quants (which gguf-py cannot quantize) are random blocks
checked against transformers' independent torch dequantizer.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from shoal.config import ConfigError, ModelConfig
from shoal.loader import (
    CheckpointError,
    default_model_path,
    iter_gguf_raw,
    iter_weights,
    load_config,
    resolve_model,
)
from shoal.loader.gguf_file import gguf_to_hf_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# relative Frobenius error each format may add to N(0, 1)-ish weights
REL_ERR = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.12, "Q4_1": 0.1}
_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    _, _, n, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{n}.{_LAYER[module]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (random bits could be inf/NaN)."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[:, -2:] = scales[:, :2]  # d at the end
    else:
        raw[:, 0:4] = scales  # d, dmin at the start
    return raw.reshape(rows, -1)


def _write_tiny_gguf(path: str, arch: str, qtypes: dict[str, str], seed: int = 0):
    """A tiny random transformers model written as a GGUF the way llama.cpp's converter would.
    Returns (state_dict, {hf name: expected dequantized tensor}, hf config)."""
    import transformers

    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    hcfg = cls_cfg(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=123456.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=1.0,
    )
    torch.manual_seed(seed)
    state = {k: v.detach().float().clone() for k, v in cls_model(hcfg).state_dict().items()}
    state = {k: torch.randn_like(v) if not v.any() else v for k, v in state.items()}  # biases start at 0
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(123456.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    expected = {}
    for name, t in state.items():
        arr = t.numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            arr = _llama_cpp_permute(arr, 4)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            arr = _llama_cpp_permute(arr, 2)
        qname = "F32" if arr.ndim == 1 else next((q for k, q in qtypes.items() if k in name), "F16")
        if qname == "F32":
            w.add_tensor(_gguf_name(name), arr.astype(np.float32))
        elif qname == "F16":
            w.add_tensor(_gguf_name(name), arr.astype(np.float16))
        elif qname in ("Q4_K", "Q5_K", "Q6_K"):
            from transformers.integrations.gguf.dequant import dequantize as hf_dequant

            raw = _random_k_blocks(Q[qname], *arr.shape, rng)
            w.add_tensor(_gguf_name(name), raw, raw_dtype=Q[qname])
            ref = hf_dequant(torch.from_numpy(raw.reshape(-1).copy()), int(Q[qname])).reshape(arr.shape)
            if arch == "llama" and ("q_proj" in name or "k_proj" in name):
                raise AssertionError("keep K-quant checks to unpermuted tensors")
            expected[name] = ref
        else:
            w.add_tensor(_gguf_name(name), quantize(arr, Q[qname]), raw_dtype=Q[qname])
        if name not in expected:
            expected[name] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state, expected, qtypes


def _check_roundtrip(path: str, state: dict, expected: dict, qtypes: dict[str, str]) -> ModelConfig:
    src = resolve_model(path)
    cfg = load_config(src)
    got = dict(iter_weights(src, cfg))
    assert sorted(got) == sorted(state)
    for name, want in expected.items():
        assert got[name].shape == want.shape and got[name].dtype == torch.float32, name
        q = "F32" if want.ndim == 1 else next((q for k, q in qtypes.items() if k in name), "F16")
        if q in REL_ERR:
            err = float((got[name] - want).norm() / want.norm())
            assert err <= REL_ERR[q], f"{name} ({q}): relative error {err:.4f}"
        else:  # K-quants: same values as transformers' dequantizer
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
    return cfg


def test_llama_gguf_unpermutes_q_and_k(tmp_path):
    """q/k rows permuted as llama.cpp does must come back in HF order, in every format."""
    qtypes = {"q_proj": "Q8_0", "k_proj": "Q4_0", "v_proj": "BF16", "o_proj": "Q4_1", "embed": "F16",
              "gate_proj": "Q4_1", "up_proj": "Q8_0", "down_proj": "Q4_0", "lm_head": "Q8_0"}
    path = str(tmp_path / "tiny-llama.gguf")
    state, expected, _ = _write_tiny_gguf(path, "llama", qtypes)
    cfg = _check_roundtrip(path, state, expected, qtypes)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 256, 4, 2)
    assert cfg.rope_theta == 123456.0 and cfg.max_position_embeddings == 512 and not cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


def test_qwen2_gguf_biases_and_k_quants(tmp_path):
    qtypes = {"q_proj": "Q4_K", "k_proj": "Q5_K", "v_proj": "Q6_K", "o_proj": "Q8_0", "gate_proj": "Q4_K",
              "up_proj": "Q5_K", "down_proj": "Q6_K", "embed": "BF16", "lm_head": "Q4_0"}
    path = str(tmp_path / "tiny-qwen2.gguf")
    state, expected, _ = _write_tiny_gguf(path, "qwen2", qtypes)
    assert "model.layers.0.self_attn.q_proj.bias" in state
    cfg = _check_roundtrip(path, state, expected, qtypes)
    assert cfg.model_type == "qwen2" and cfg.attention_bias


def test_unsupported_gguf_architecture(tmp_path):
    path = str(tmp_path / "mamba.gguf")
    w = GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="general.architecture='mamba'"):
        load_config(resolve_model(path))


# ----------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default():
    src = resolve_model(None)
    return src, load_config(src)


def test_default_model_config(default):
    _, cfg = default
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert cfg.intermediate_size == 1536 and cfg.max_position_embeddings == 8192
    assert cfg.eos_token_ids == (2,) and abs(cfg.rms_norm_eps - 1e-5) < 1e-9


@pytest.mark.slow
def test_default_model_weights_equal_transformers(default):
    """Dequantized, renamed and un-permuted weights equal what transformers loads from the file."""
    from transformers import AutoModelForCausalLM

    src, cfg = default
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(src.path), gguf_file=os.path.basename(src.path), dtype=torch.float32
    ).state_dict()
    names = set()
    for name, t in iter_weights(src, cfg):
        names.add(name)
        torch.testing.assert_close(t, hf[name], rtol=0, atol=1e-6, msg=name)
    assert names == set(hf) - {"lm_head.weight"}  # tied: the engine reuses the embedding
    assert {"model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight"} <= names


def test_raw_tensors_dequantize_to_iter_weights(default):
    from gguf.quants import dequantize

    src, cfg = default
    want = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"}
    raw = {n: r for n, r in iter_gguf_raw(src, cfg) if n in want}
    assert raw["model.layers.0.self_attn.q_proj.weight"].qtype == "Q4_1"
    assert raw["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert raw["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert raw["model.embed_tokens.weight"].qtype == "Q8_0"
    deq = {n: w for n, w in iter_weights(src, cfg) if n in want}
    for n, r in raw.items():
        got = torch.from_numpy(dequantize(r.data, Q[r.qtype]).reshape(r.shape).copy())
        assert torch.equal(got, deq[n]), n


@pytest.mark.parametrize("keep", [1000, 5_000_000, -1000])
def test_truncated_gguf_names_the_file(tmp_path, keep):
    data_path = default_model_path()
    size = os.path.getsize(data_path)
    bad = tmp_path / "cut.gguf"
    with open(data_path, "rb") as f:
        bad.write_bytes(f.read(keep if keep > 0 else size + keep))
    with pytest.raises(CheckpointError) as e:
        src = resolve_model(str(bad))
        list(iter_weights(src, load_config(src)))
    assert str(bad) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)


def test_deepseek2_metadata_maps_to_mla_config():
    meta = {
        "general.architecture": "deepseek2", "deepseek2.block_count": 27, "deepseek2.context_length": 163840,
        "deepseek2.embedding_length": 2048, "deepseek2.feed_forward_length": 10944,
        "deepseek2.attention.head_count": 16, "deepseek2.attention.head_count_kv": 16,
        "deepseek2.rope.freq_base": 10000.0, "deepseek2.attention.layer_norm_rms_epsilon": 1e-6,
        "deepseek2.expert_used_count": 6, "deepseek2.leading_dense_block_count": 1, "deepseek2.vocab_size": 102400,
        "deepseek2.attention.kv_lora_rank": 512, "deepseek2.attention.key_length": 192,
        "deepseek2.attention.value_length": 128, "deepseek2.expert_feed_forward_length": 1408,
        "deepseek2.expert_count": 64, "deepseek2.expert_shared_count": 2, "deepseek2.expert_weights_scale": 1.0,
        "deepseek2.rope.dimension_count": 64, "deepseek2.rope.scaling.type": "yarn",
        "deepseek2.rope.scaling.factor": 40.0, "deepseek2.rope.scaling.original_context_length": 4096,
        "deepseek2.rope.scaling.yarn_log_multiplier": 0.0707, "tokenizer.ggml.bos_token_id": 100000,
        "tokenizer.ggml.eos_token_id": 100001,
    }
    cfg = ModelConfig.from_hf_dict(gguf_to_hf_dict(meta, {"token_embd.weight", "output.weight"}))
    assert cfg.model_type == "deepseek_v2" and cfg.is_mla and cfg.q_lora_rank is None
    assert (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (512, 128, 64, 128)
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok) == (64, 2, 6)
    assert cfg.first_k_dense_replace == 1 and cfg.moe_intermediate_size == 1408
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 40.0
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096
    assert abs(cfg.rope_scaling["mscale_all_dim"] - 0.707) < 1e-6
