"""Hugging Face model directories: `config.json` (+ `generation_config.json`) and safetensors
weights, single-file or sharded through `model.safetensors.index.json`.

Weights are read lazily, one tensor at a time, with `safetensors.safe_open`; every file's header
is validated against its size first, so a truncated download is reported by name instead of
failing half-way through loading. Pickle (`*.bin`) is never opened.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from shoal.config import ModelConfig

from .source import CheckpointError, ModelNotFound

_INDEX = "model.safetensors.index.json"
_GEN_DEFAULT_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_new_tokens", "do_sample",
)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelNotFound(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def read_hf_config_dict(directory: str) -> dict[str, Any]:
    """config.json, with generation_config.json's eos ids merged into `eos_token_id`."""
    d = _read_json(os.path.join(directory, "config.json"))
    if "text_config" in d and "model_type" not in d:
        d = dict(d["text_config"])
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        gen = _read_json(gen_path)
        eos: list[int] = []
        for v in (d.get("eos_token_id"), gen.get("eos_token_id")):
            for i in v if isinstance(v, list) else [v]:
                if i is not None and int(i) not in eos:
                    eos.append(int(i))
        if eos:
            d["eos_token_id"] = eos
        if d.get("bos_token_id") is None and gen.get("bos_token_id") is not None:
            d["bos_token_id"] = gen["bos_token_id"]
    return d


def load_hf_config(directory: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(read_hf_config_dict(directory))


def load_hf_generation_defaults(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    gen = _read_json(path)
    return {k: gen[k] for k in _GEN_DEFAULT_KEYS if gen.get(k) is not None}


def _validate_safetensors(path: str) -> list[str]:
    """Check the header against the file size; returns the tensor names in file order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, no safetensors header); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path} is truncated or not safetensors (header claims {n} bytes, file has {size}); re-download it"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header; re-download it") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}; re-download it"
        )
    return [k for k in header if k != "__metadata__"]


def safetensors_files(directory: str) -> tuple[list[str], dict[str, str] | None]:
    """The weight files (in order) and, for sharded checkpoints, the index's name → file map."""
    index_path = os.path.join(directory, _INDEX)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no 'weight_map'; re-download it")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index_path} lists missing shard(s) {missing[:3]} in {directory}; re-download them")
        return [os.path.join(directory, f) for f in files], weight_map
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single], None
    files = sorted(
        os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors")
    )
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {directory}; shoal loads safetensors only (no pickle .bin)")
    return files, None


def iter_safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, lazily, in stored dtype."""
    files, weight_map = safetensors_files(directory)
    names_per_file = {path: _validate_safetensors(path) for path in files}  # fail before yielding anything
    if weight_map is not None:
        found = {n for names in names_per_file.values() for n in names}
        missing = [n for n in weight_map if n not in found]
        if missing:
            raise CheckpointError(
                f"{os.path.join(directory, _INDEX)} lists tensor(s) absent from the shards, e.g. {missing[:3]}; "
                "re-download the checkpoint"
            )
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in names_per_file[path]:
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt data
            if type(e).__name__ in ("SafetensorError", "OSError"):
                raise CheckpointError(f"{path} is unreadable ({e}); re-download it") from None
            raise
