"""Tokenizer from a Hugging Face dir (tokenizer.json + tokenizer_config.json + chat_template.jinja),
BOS handling, end-of-turn ids, and the sandboxed chat template."""

from __future__ import annotations

import json
import logging
import os

import pytest

from shoal.loader import ChatTemplateError, Tokenizer, render_chat_template, resolve_model
from shoal.loader.source import ModelSource

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["Hello world", "数学 and émojis 🤗", "<|im_start|>user\nhi<|im_end|>", "  x  \n\n y"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The default model's tokenizer saved by transformers the way a Hub repo ships it."""
    from transformers import AutoTokenizer

    src = resolve_model(None)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path))
    out = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(out)
    return out, hf


def test_hf_dir_tokenizer_matches_transformers(hf_dir):
    path, hf = hf_dir
    tok = Tokenizer.from_source(ModelSource("hf_dir", str(path), "tok"))
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text)
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    assert tok.chat_template == hf.chat_template  # transformers 5 writes it to chat_template.jinja
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert 2 in tok.eos_token_ids and tok.eos_token_id == 2


def test_add_bos_token_and_generation_eos(hf_dir, tmp_path):
    path, _ = hf_dir
    d = tmp_path / "bos"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>",
         "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]}
    ))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 17]}))
    tok = Tokenizer.from_source(ModelSource("hf_dir", str(d), "bos"))
    assert tok.bos_token_id == 0
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0
    assert tok.encode("<|endoftext|>hi").count(0) == 1  # not doubled when the text starts with BOS
    assert {2, 17, 0} <= tok.eos_token_ids
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|>x"


def test_template_cannot_reach_python_internals():
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [], True, None, None)
    with pytest.raises(ChatTemplateError):
        render_chat_template("{% set x = messages.append(1) %}", [], True, None, None)  # immutable


def test_raise_exception_and_helpers():
    t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    with pytest.raises(ChatTemplateError, match="first message must be user"):
        render_chat_template(t, [{"role": "system", "content": "s"}], True, None, None)
    assert render_chat_template(t, [{"role": "user", "content": "u"}], True, None, None) == "ok"
    out = render_chat_template("{{ x | tojson }} {{ strftime_now('%Y') }}", [], True, None, None, x={"k": "é<"})
    assert out.startswith('{"k": "é<"} ') and out[-4:].isdigit()


def test_missing_template_falls_back_to_chatml(caplog):
    with caplog.at_level(logging.WARNING):
        out = render_chat_template(None, [{"role": "user", "content": "hi"}], True, None, None)
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert any("no chat template" in r.message for r in caplog.records)
