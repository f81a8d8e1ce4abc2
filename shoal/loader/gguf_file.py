"""GGUF files (llama.cpp's format): metadata → an HF-style config dict, and tensors → HF names.

Data flow: `GGUFReader` memory-maps the file → metadata keys are mapped onto the names a
`config.json` would use (`gguf_to_hf_dict`) → each tensor is renamed (`blk.3.attn_q.weight` →
`model.layers.3.self_attn.q_proj.weight`), dequantized with `gguf.quants.dequantize` to float32
and given the HF shape (GGUF lists dims fastest-first, so the shape is reversed).

llama.cpp's converter permutes the rows of q_proj/k_proj of llama-architecture models so that
rope pairs are adjacent (GPT-J style); `_unpermute` puts them back into Hugging Face's
half-split order. qwen2 and deepseek2 files are stored unpermuted.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shoal.config import ConfigError, ModelConfig

from .source import CheckpointError

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "deepseek2": "deepseek_v2"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# per-layer GGUF name → HF module path under model.layers.N.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # DeepSeek MLA
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    # DeepSeek MoE
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFRawTensor:
    qtype: str  # GGML type name: "Q4_1", "Q8_0", "F32", ...
    data: np.ndarray  # as stored: uint8 blocks for quantized types, float arrays otherwise
    shape: tuple[int, ...]  # logical HF shape (GGUF dims reversed)


# ----------------------------------------------------------------------------- reading


@functools.cache
def _reader_class() -> type:
    """`gguf.GGUFReader`, slicing the file as a plain ndarray view of its memory map: the reader
    reads each metadata value with a slice of `np.memmap`, whose subclass hooks cost ~10 µs a
    slice, and the default model's 98k vocabulary strings made opening it take 3.5 s (same bytes,
    same fields and tensors either way; the tensors still read from the mapped file)."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count, dt = int(count), np.dtype(dtype)
            arr = plain[offset: offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime: float, size: int) -> Any:
    try:
        reader = _reader_class()(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on short files
        raise CheckpointError(
            f"{path} is truncated or not a GGUF file ({type(e).__name__}: {e}); re-download it"
        ) from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name!r} needs bytes up to {t.data_offset + t.n_bytes}, "
                f"the file has {size}; re-download it"
            )
    return reader


def open_gguf(path: str) -> Any:
    """A (cached) `gguf.GGUFReader`; truncated or foreign files raise CheckpointError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        from .source import ModelNotFound

        raise ModelNotFound(f"{path} does not exist") from None
    if st.st_size < 24:
        raise CheckpointError(f"{path} is truncated ({st.st_size} bytes) or not a GGUF file; re-download it")
    return _open_cached(os.path.abspath(path), st.st_mtime, st.st_size)


def read_metadata(reader: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """All metadata as Python values (strings, numbers, lists); keys in `skip` are left out."""
    out = {}
    for key, field in reader.fields.items():
        if key in skip or key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise CheckpointError(f"GGUF metadata key {key!r} is unreadable ({e}); the file is corrupt") from None
    return out


# ----------------------------------------------------------------------------- config


def gguf_to_hf_dict(meta: dict[str, Any], tensor_names: set[str], path: str = "") -> dict[str, Any]:
    """Map llama.cpp metadata keys onto a Hugging Face config.json dict."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ConfigError(
            f"unsupported GGUF general.architecture={arch!r} in {path or 'the file'}; "
            f"shoal reads: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}"
        )

    def g(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_vocab = g("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    d: dict[str, Any] = {
        "model_type": SUPPORTED_GGUF_ARCHS[arch],
        "vocab_size": n_vocab,
        "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": g("attention.head_count"),
        "num_key_value_heads": g("attention.head_count_kv"),
        "max_position_embeddings": g("context_length"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "rope_theta": g("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "torch_dtype": {0: "float32", 1: "float16", 32: "bfloat16"}.get(meta.get("general.file_type"), "float32"),
        "_name_or_path": meta.get("general.name"),
    }
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    d["eos_token_id"] = list(dict.fromkeys(int(i) for i in eos if i is not None))
    if isinstance(d["num_key_value_heads"], list):  # per-layer list in some files
        d["num_key_value_heads"] = max(d["num_key_value_heads"])
    if isinstance(d["intermediate_size"], list):
        d["intermediate_size"] = max(d["intermediate_size"])
    if g("attention.key_length") and arch != "deepseek2":
        d["head_dim"] = g("attention.key_length")
    elif g("rope.dimension_count") and arch == "llama":
        d["head_dim"] = g("rope.dimension_count")

    scaling = g("rope.scaling.type")
    if scaling and scaling != "none":
        rs: dict[str, Any] = {"rope_type": scaling, "factor": float(g("rope.scaling.factor", 1.0))}
        if g("rope.scaling.original_context_length"):
            rs["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length"))
        if scaling == "yarn" and g("rope.scaling.yarn_log_multiplier"):
            mscale = float(g("rope.scaling.yarn_log_multiplier")) / 0.1  # llama.cpp stores 0.1 * mscale_all_dim
            rs["mscale"] = rs["mscale_all_dim"] = mscale
        d["rope_scaling"] = rs
    elif arch == "llama" and "rope_freqs.weight" in tensor_names:
        d["rope_scaling"] = {"rope_type": "llama3"}  # factors filled in by load_gguf_config from the tensor

    if arch == "deepseek2":
        d.update(_deepseek2_fields(meta, tensor_names))
    return d


def _deepseek2_fields(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    def g(key: str, default: Any = None) -> Any:
        return meta.get(f"deepseek2.{key}", default)

    rope_dim = int(g("rope.dimension_count", 64))
    key_len = g("attention.key_length_mla") or g("attention.key_length")
    v_len = g("attention.value_length_mla") or g("attention.value_length")
    sigmoid = g("expert_gating_func") == 2 or any(n.endswith("exp_probs_b.bias") for n in tensor_names)
    n_group = int(g("expert_group_count", 1) or 1)
    return {
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "num_key_value_heads": g("attention.head_count"),  # HF DeepSeek configs: kv heads == heads
        "q_lora_rank": g("attention.q_lora_rank") or None,
        "kv_lora_rank": g("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": int(key_len) - rope_dim if key_len else None,
        "v_head_dim": v_len,
        "n_routed_experts": g("expert_count", 0),
        "n_shared_experts": g("expert_shared_count", 0),
        "num_experts_per_tok": g("expert_used_count", 0),
        "moe_intermediate_size": g("expert_feed_forward_length", 0),
        "first_k_dense_replace": g("leading_dense_block_count", 0),
        "routed_scaling_factor": g("expert_weights_scale", 1.0),
        "norm_topk_prob": bool(g("expert_weights_norm", False)),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "n_group": n_group,
        "topk_group": int(g("expert_group_used_count", 1) or 1),
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if n_group > 1 else "greedy"),
        "num_nextn_predict_layers": g("nextn_predict_layers", 0),
        "rope_interleave": True,
    }


def load_gguf_config(path: str) -> ModelConfig:
    reader = open_gguf(path)
    meta = read_metadata(reader, skip=("tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))
    names = {t.name for t in reader.tensors}
    d = gguf_to_hf_dict(meta, names, path)
    if d.get("rope_scaling", {}).get("rope_type") == "llama3":
        d["rope_scaling"] = _llama3_scaling(reader, d)
    return ModelConfig.from_hf_dict(d)


def _llama3_scaling(reader: Any, d: dict[str, Any]) -> dict[str, Any] | None:
    """Llama 3.1+ files store rope scaling only as a `rope_freqs` factor tensor; rebuild the
    HF `rope_scaling` from it (factor = its largest value; the other fields are the Llama 3.x
    values, which llama.cpp's converter assumes as well)."""
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(_dequantize(t), dtype=np.float32).reshape(-1)
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    return {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


# ----------------------------------------------------------------------------- tensors


def hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name; None for tensors handled elsewhere or unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if not m:
        return None
    layer, part, kind = m.groups()
    if part == "exp_probs_b":
        return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
    if part in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    return None


def _hf_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(list(t.shape)))


def _dequantize(t: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if t.tensor_type == GGMLQuantizationType.F32:
        arr = np.array(t.data, dtype=np.float32, copy=True)  # t.data is a read-only memmap view
    else:
        arr = dequantize(np.asarray(t.data), t.tensor_type)
    return arr.reshape(_hf_shape(t))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` of q/k rows: within each head, llama.cpp orders the
    rotary pairs (x0, x_d/2), (x1, x_d/2+1)...; HF keeps the two halves apart."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(path: str, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every weight of the file, dequantized lazily."""
    reader = open_gguf(path)
    arch = config.family
    kv_b_parts: dict[str, dict[str, torch.Tensor]] = {}
    has_kv_b = any(t.name.endswith("attn_kv_b.weight") for t in reader.tensors)
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling
        try:
            w = torch.from_numpy(np.ascontiguousarray(_dequantize(t), dtype=np.float32))
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} uses GGML type {t.tensor_type.name}, which shoal cannot dequantize"
            ) from None
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {t.name!r} is corrupt or truncated ({e}); re-download it") from None
        m = _BLK.match(t.name)
        part = m.group(2) if m else ""
        if part in _EXPERT_NAMES:  # [n_experts, out, in] → one tensor per expert
            for e in range(w.shape[0]):
                yield f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_NAMES[part]}.weight", w[e].clone()
            continue
        if part in ("attn_k_b", "attn_v_b"):
            if has_kv_b:
                continue
            layer = m.group(1)
            kv_b_parts.setdefault(layer, {})[part] = w
            if len(kv_b_parts[layer]) == 2:
                yield f"model.layers.{layer}.self_attn.kv_b_proj.weight", _join_kv_b(kv_b_parts.pop(layer))
            continue
        name = hf_name(t.name)
        if name is None:
            log.warning("%s: skipping GGUF tensor %r (no Hugging Face name for it)", path, t.name)
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_key_value_heads)
        yield name, w


def _join_kv_b(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """llama.cpp splits kv_b_proj into k_b [heads, kv_lora, nope] and v_b [heads, v, kv_lora]."""
    k_b, v_b = parts["attn_k_b"], parts["attn_v_b"]
    n_head, kv_lora = k_b.shape[0], k_b.shape[1]
    kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [heads, nope + v, kv_lora]
    return kv_b.reshape(-1, kv_lora).contiguous()


def iter_gguf_raw(path: str, config: ModelConfig | None = None) -> Iterator[tuple[str, GGUFRawTensor]]:
    """(HF name, stored blocks) for a quantized-linear loader. Quantization blocks run along a
    row, so llama's q/k row permutation is undone on the raw rows here too: dequantizing the
    returned data gives exactly what `iter_gguf_weights` yields."""
    reader = open_gguf(path)
    config = config or load_gguf_config(path)
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        data = np.asarray(t.data)
        if config.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            rows = data.shape[0]
            data = data.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(data.shape)
        yield name, GGUFRawTensor(qtype=t.tensor_type.name, data=data, shape=_hf_shape(t))
