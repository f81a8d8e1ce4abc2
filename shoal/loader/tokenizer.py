"""The tokenizer: a `tokenizers.Tokenizer` plus what the checkpoint says around it (BOS/EOS,
whether to add BOS, the chat template).

Hugging Face dirs ship `tokenizer.json` + `tokenizer_config.json`. GGUF files carry the
vocabulary, merges and token types as metadata; `_from_gguf` rebuilds the same byte-level BPE
tokenizer llama.cpp uses, with the pre-tokenizer named by `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .chat_template import render_chat_template
from .gguf_file import open_gguf, read_metadata
from .source import CheckpointError, ModelSource

log = logging.getLogger(__name__)

# special tokens that end a turn in common chat templates; added to eos_token_ids when present
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<｜end▁of▁sentence｜>")

# ---- pre-tokenizer splits, by GGUF `tokenizer.ggml.pre` (the regexes of llama.cpp / the HF repos)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(*regexes: str) -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


_PRE_TOKENIZERS = {
    **{k: lambda: _split(_LLAMA3) for k in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")},
    **{k: lambda: _split(_QWEN2) for k in ("qwen2", "deepseek-r1-qwen", "megrez")},
    "deepseek-v3": lambda: _split(r"\p{N}{1,3}", r"[一-龥\u3040-ゟ゠-ヿ]+", _DEEPSEEK3),
    # SmolLM/StarCoder: every digit alone, then GPT-2's split
    **{k: _digits_then_gpt2 for k in ("smollm", "starcoder", "refact")},
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _special_text(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(
        self,
        tk: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_ids: tuple[int, ...] = (),
        name_or_path: str = "",
    ) -> None:
        self._tk = tk
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        self.vocab_size: int = tk.get_vocab_size(with_added_tokens=True)
        eos = {self.eos_token_id, *extra_eos_ids}
        special = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
        eos |= {self.token_to_id(t) for t in END_TOKENS if t in special}
        self.eos_token_ids: set[int] = {i for i in eos if i is not None}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_source(cls, src: ModelSource) -> "Tokenizer":
        if src.kind == "gguf":
            return cls._from_gguf(src.path)
        return cls._from_hf_dir(src.path)

    @classmethod
    def _from_hf_dir(cls, directory: str) -> "Tokenizer":
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(
                f"no tokenizer.json in {directory}; shoal needs the fast-tokenizer file (save it with "
                "transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
            )
        try:
            tk = HFTokenizer.from_file(path)
        except Exception as e:
            raise CheckpointError(f"{path} is unreadable ({e}); re-download it") from None
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        bos = _special_text(cfg.get("bos_token"))
        gen_eos: tuple[int, ...] = ()
        gen_path = os.path.join(directory, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                e = json.load(f).get("eos_token_id")
            gen_eos = tuple(int(i) for i in (e if isinstance(e, list) else [e]) if i is not None)
        return cls(
            tk,
            bos_token=bos,
            eos_token=_special_text(cfg.get("eos_token")),
            pad_token=_special_text(cfg.get("pad_token")),
            unk_token=_special_text(cfg.get("unk_token")),
            add_bos_token=bool(cfg.get("add_bos_token", False)) and bos is not None,
            chat_template=template,
            extra_eos_ids=gen_eos,
            name_or_path=directory,
        )

    @classmethod
    def _from_gguf(cls, path: str) -> "Tokenizer":
        meta = read_metadata(open_gguf(path), skip=("tokenizer.ggml.scores",))
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise CheckpointError(f"{path} has no tokenizer (metadata tokenizer.ggml.tokens is missing)")
        if kind != "gpt2":
            raise CheckpointError(
                f"{path}: GGUF tokenizer.ggml.model={kind!r} is not supported yet (shoal reads 'gpt2' byte-level BPE); "
                "use the model's Hugging Face directory instead"
            )
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tk = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], types, meta.get("tokenizer.ggml.pre"))

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        extra = tuple(int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta)
        return cls(
            tk,
            bos_token=tok("bos"),
            eos_token=tok("eos"),
            pad_token=tok("padding"),
            unk_token=tok("unknown"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)) and tok("bos") is not None,
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_ids=extra,
            name_or_path=path,
        )

    # ------------------------------------------------------------------ use
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def token_to_id(self, t: str) -> int | None:
        return self._tk.token_to_id(t)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        for k in ("pad_token", "unk_token"):
            if getattr(self, k) is not None:
                kwargs.setdefault(k, getattr(self, k))
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, **kwargs,
        )

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """An upper bound on the characters of text one token can stand for, or None where there is
        none. It lets the server refuse a prompt that cannot fit the context without tokenizing it
        (seconds for megabytes of text). Only byte-level BPE has a bound: every character becomes at
        least one byte and every byte is kept, so a token covers at most its own length in
        characters; an unknown-token model maps any unseen word to one token, and a pre-tokenizer
        that removes text (whitespace splitting) or a normalizer that deletes it has none. NFC/NFKC
        compose a few code points into one, hence the margin."""
        model = self._tk.model
        if type(model).__name__ != "BPE" or (model.unk_token is not None and model.fuse_unk):
            return None
        pre = self._tk.pre_tokenizer
        pre_state = pre.__getstate__() if pre is not None else b""
        if b'"ByteLevel"' not in pre_state or b'"Removed"' in pre_state:
            return None
        factor = 1
        norm = self._tk.normalizer
        if norm is not None:
            kinds = set(re.findall(rb'"type":\s*"(\w+)"', norm.__getstate__())) - {b"Sequence"}
            if not kinds <= {b"NFC", b"NFKC"}:
                return None
            factor = 4 if kinds else 1
        longest = max(len(t) for t in self._tk.get_vocab(with_added_tokens=True))
        return longest * factor

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (batch encoding, offsets)."""
        return self._tk

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eos={sorted(self.eos_token_ids)})"


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str | None) -> HFTokenizer:
    """llama.cpp's 'gpt2' tokenizer: byte-level BPE; control tokens (type 3) are special added
    tokens, user-defined ones (type 4, e.g. <think>) plain added tokens, both matched whole."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre not in _PRE_TOKENIZERS:
        log.warning("GGUF tokenizer.ggml.pre=%r is unknown to shoal; using GPT-2's split", pre)
    tk.pre_tokenizer = _PRE_TOKENIZERS.get(pre or "default", _PRE_TOKENIZERS["default"])()
    tk.decoder = decoders.ByteLevel()
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels: leave them out
    control = [
        AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet
    ]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)
    return tk
