"""Hugging Face dirs: config parsing and weights of tiny random Llama/Qwen2 checkpoints saved by
transformers (sharded, with index.json), and every way a dir can be broken."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from shoal.config import ConfigError
from shoal.loader import (
    CheckpointError,
    ModelNotFound,
    Tokenizer,
    iter_weights,
    load_config,
    load_generation_defaults,
    resolve_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _save_tiny(kind: str, path: str) -> dict[str, torch.Tensor]:
    import transformers

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=50000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**common))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7], "temperature": 0.6, "top_p": 0.95}, f)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"tiny-{request.param}"))
    return request.param, path, _save_tiny(request.param, path)


def test_tiny_config_and_sharded_weights_match_state_dict(tiny):
    kind, path, state = tiny
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")), "fixture should be sharded"
    src = resolve_model(path)
    assert src.kind == "hf_dir" and src.path == os.path.abspath(path) and src.name == os.path.basename(path)
    cfg = load_config(src)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == (kind, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 50000.0 and cfg.vocab_size == 512 and not cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (2, 7)  # generation_config.json's eos ids merged in
    assert cfg.attention_bias == (kind == "qwen2")
    got = dict(iter_weights(src, cfg))
    assert sorted(got) == sorted(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert load_generation_defaults(src) == {"temperature": 0.6, "top_p": 0.95}


def test_weights_are_yielded_lazily(tiny):
    _, path, _ = tiny
    src = resolve_model(path)
    it = iter_weights(src, load_config(src))
    name, t = next(it)
    assert isinstance(name, str) and isinstance(t, torch.Tensor)
    it.close()


def test_missing_path_names_it():
    with pytest.raises(ModelNotFound, match="/no/such/model") as e:
        resolve_model("/no/such/model")
    assert "\n" not in str(e.value)


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError) as e:
        resolve_model(str(tmp_path))
    assert f"no *.safetensors weights in {tmp_path}" in str(e.value) and "no pickle" in str(e.value)


def test_pickle_only_dir_is_refused_without_opening(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError) as e:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "pickle" in str(e.value) and "safetensors" in str(e.value)


def test_truncated_safetensors_names_the_file(tiny, tmp_path):
    _, path, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[-1]
    data = (bad / shard).read_bytes()
    (bad / shard).write_bytes(data[: len(data) - 100])
    src = resolve_model(str(bad))
    with pytest.raises(CheckpointError, match="truncated") as e:
        list(iter_weights(src, load_config(src)))
    assert str(bad / shard) in str(e.value) and "\n" not in str(e.value)


def test_index_listing_absent_tensor(tiny, tmp_path):
    _, path, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    some_file = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = some_file
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    src = resolve_model(str(bad))
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
        list(iter_weights(src, load_config(src)))


def test_unsupported_model_type(tiny, tmp_path):
    _, path, _ = tiny
    bad = tmp_path / "mamba"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type='mamba'"):
        load_config(resolve_model(str(bad)))


def test_tokenizerless_dir(tiny):
    _, path, _ = tiny
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_source(resolve_model(path))
    assert f"no tokenizer.json in {os.path.abspath(path)}" in str(e.value)


def test_loading_never_unpickles(tiny, monkeypatch):
    """Loading a dir must not touch torch.load or pickle (they can run code from a checkpoint)."""
    _, path, state = tiny

    def boom(*a, **k):
        raise AssertionError("pickle/torch.load used while loading")

    for mod, fn in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, fn, boom)
    src = resolve_model(path)
    assert len(dict(iter_weights(src, load_config(src)))) == len(state)
