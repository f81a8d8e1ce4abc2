"""Qwen2 / Qwen2.5 and DeepSeek-R1-Distill-Qwen: the Llama block with a bias on the q/k/v projections."""

from __future__ import annotations

from shoal.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
