"""Helpers for the DeepSeek tests: tiny random DeepSeek-V2/V3 checkpoints made by `transformers`,
shoal's model loaded from them, and a small paged-cache harness that drives the model the way the
runner does (flat batch of several requests, contiguous blocks per request, block_size 16)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shoal.config import ModelConfig
from shoal.forward_batch import AttentionMetadata, ForwardBatch
from shoal.loader import iter_weights, load_config, resolve_model
from tests.tiny import write_tokenizer

YARN = {
    "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
}

BASE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
    n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_theta=10000.0, initializer_range=0.25, tie_word_embeddings=False, rope_scaling=YARN,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# name → (transformers class family, config overrides): together they cover q_lora_rank null and
# set, n_group > 1 with topk_group < n_group, shared experts, first_k_dense_replace ≥ 1, YaRN,
# sigmoid (noaux_tc with a random correction bias) and softmax scoring (greedy and group-limited).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "v3": ("v3", dict(norm_topk_prob=True, routed_scaling_factor=2.5,
                      rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # cos/sin scaled too: mscale(factor, 1.0) / mscale(factor, 0.8) != 1
    "v3-qnull-dense2": ("v3", dict(q_lora_rank=None, first_k_dense_replace=2, n_shared_experts=2,
                                   num_hidden_layers=4, n_group=2, topk_group=1, num_experts_per_tok=3,
                                   rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8})),
    "v2-lite": ("v2", dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, n_shared_experts=2,
                           num_experts_per_tok=6)),
    "v2-grouped": ("v2", dict(topk_method="group_limited_greedy", routed_scaling_factor=2.0)),
}


def make_deepseek(path: Path, variant: str, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random transformers DeepSeek model (safetensors + tokenizer) under `path`."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    family, extra = VARIANTS[variant]
    kw = dict(BASE)
    kw.update(extra)
    kw.update(overrides)
    torch.manual_seed(seed)
    if family == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
        with torch.no_grad():  # transformers starts the bias at zero, which would test nothing
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, int(kw["vocab_size"]))
    return path


def hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def shoal_model(path: Path, dtype: torch.dtype = torch.float32, mla_mode: str = "auto",
                config: ModelConfig | None = None, weights: Any = None) -> torch.nn.Module:
    """shoal's model built and loaded the way the runner does it (minus the runner)."""
    from shoal.models.registry import model_class

    src = resolve_model(str(path))
    cfg = config or load_config(src)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_class(cfg)(cfg, mla_mode=mla_mode)
    finally:
        torch.set_default_dtype(prev)
    model.load_weights(weights if weights is not None else iter_weights(src, cfg))
    model.process_weights_after_loading()
    return model.eval()


class PagedHarness:
    """Owns the paged caches of one model and runs steps over a fixed set of sequences."""

    def __init__(self, model: torch.nn.Module, num_seqs: int, max_len: int = 128, block_size: int = 16,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.bs = block_size
        self.per_seq = (max_len + block_size - 1) // block_size
        num_blocks = num_seqs * self.per_seq + 1  # block 0 is never used: padding in block tables
        dtype = dtype or next(model.parameters(), torch.empty(0)).dtype
        for m in model.modules():
            if hasattr(m, "kv_cache_spec") and hasattr(m, "bind_kv_cache"):
                m.bind_kv_cache({k: torch.zeros(num_blocks, block_size, *shape, dtype=dtype)
                                 for k, shape in m.kv_cache_spec().items()})
        self.lens = [0] * num_seqs

    def blocks(self, i: int) -> list[int]:
        return [1 + i * self.per_seq + j for j in range(self.per_seq)]

    def batch(self, new: dict[int, list[int]]) -> ForwardBatch:
        """A ForwardBatch for the sequences in `new` (seq index → its new tokens), lengths advanced."""
        ids, pos, slots, qlens, slens, tables, last = [], [], [], [], [], [], []
        for i, toks in new.items():
            start = self.lens[i]
            rng = range(start, start + len(toks))
            ids += toks
            pos += list(rng)
            table = self.blocks(i)
            slots += [table[p // self.bs] * self.bs + p % self.bs for p in rng]
            qlens.append(len(toks))
            slens.append(start + len(toks))
            tables.append(table)
            last.append(len(ids) - 1)
            self.lens[i] = start + len(toks)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl), seq_lens=torch.tensor(slens),
            block_tables=torch.tensor(tables), query_lens_cpu=qlens, seq_lens_cpu=slens, block_size=self.bs,
            max_query_len=max(qlens), max_seq_len=max(slens),
        )
        return ForwardBatch(torch.tensor(ids), torch.tensor(pos), meta, torch.tensor(last))

    @torch.inference_mode()
    def step(self, new: dict[int, list[int]]) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
        """Run one forward; returns (logits of every new token [T, V], the batch, hidden [T, D])."""
        fb = self.batch(new)
        hidden = self.model(fb)
        return self.model.compute_logits(hidden), fb, hidden

    def greedy(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """Prefill all prompts in one batch, then decode n - 1 steps with decode-only batches.
        Returns the n greedy tokens and the logits each was chosen from, per prompt."""
        logits, fb, _ = self.step(dict(enumerate(prompts)))
        last = logits[fb.logits_indices]
        toks = [[int(r.argmax())] for r in last]
        steps = [[r] for r in last]
        for _ in range(n - 1):
            logits, _, _ = self.step({i: [t[-1]] for i, t in enumerate(toks)})
            for i, r in enumerate(logits):
                toks[i].append(int(r.argmax()))
                steps[i].append(r)
        return toks, steps


@torch.no_grad()
def hf_greedy_logits(model: torch.nn.Module, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The reference's greedy continuation (with its own cache) and its last-position logits."""
    out = model(torch.tensor([ids]), use_cache=True)
    toks, rows = [], []
    for _ in range(n):
        row = out.logits[0, -1]
        rows.append(row)
        toks.append(int(row.argmax()))
        out = model(torch.tensor([[toks[-1]]]), cache=out.cache, use_cache=True)
    return toks, rows


def first_near_tie(rows: list[torch.Tensor], eps: float = 1e-3) -> int:
    """First step whose top-2 logit margin is below eps (float rounding could flip it), or len(rows)."""
    for i, r in enumerate(rows):
        top2 = r.topk(2).values
        if float(top2[0] - top2[1]) < eps:
            return i
    return len(rows)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not fight the other test processes for the
    cores); restored afterwards. Import this fixture into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
