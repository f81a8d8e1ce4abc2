"""The batch handed from the model runner to the model: flat tokens plus paged-attention metadata.

Data flow: `Scheduler.schedule()` → `SchedulerOutput` (request → tokens to compute) → `ModelRunner`
builds one `ForwardBatch` (all requests' new tokens flattened, no padding) → the model's attention
layers write the new K/V (or MLA latent) into the paged cache at `slot_mapping` and attend over each
request's blocks → the runner gathers hidden states at `logits_indices` (last new token of each
request that samples) and computes logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: flat cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B+1] long: offsets of each request's new tokens in the flat batch
    seq_lens: torch.Tensor  # [B] long: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0
    query_lens_cpu: list[int]  # per-request number of new tokens (host copy for loops)
    seq_lens_cpu: list[int]  # per-request context length (host copy)
    block_size: int
    max_query_len: int
    max_seq_len: int
    # what a platform's ops derive from this metadata, kept for the step's other layers (eager steps;
    # keys are the platform's own)
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] long: rows of the hidden states to turn into logits

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
