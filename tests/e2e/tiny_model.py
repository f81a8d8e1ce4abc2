"""A tiny Llama checkpoint (HF directory, safetensors) that "reasons" on cue, for the server tests.

Every layer's output projections (o_proj, down_proj) are zero, so the residual stream at a position
is just the embedding of that position's token, and the next-token logits depend on the current
token alone. The LM head is then wired as a lookup table `NEXT`: after the prompt's final "\\n"
(the template ends with `<|im_start|>assistant\\n<think>\\n`) greedy decoding writes
`Hmm, thinking</think>The answer` and then `<|im_end|>`. The tokenizer is the default model's
(SmolLM2) plus `<think>`/`</think>` as plain added tokens, as in DeepSeek-R1's tokenizer.
"""

from __future__ import annotations

import json
import os

THINK_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
# a template that tries to reach Python internals: the sandbox must refuse to render it
EVIL_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"

REASONING = "Hmm, thinking"
ANSWER = "The answer"


def build_tiny_reasoning_model(path: str, chat_template: str = THINK_TEMPLATE) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shoal.loader import Tokenizer, resolve_model

    base = Tokenizer.from_source(resolve_model(None)).backend
    tk = type(base).from_str(base.to_str())  # a copy
    tk.add_tokens(["<think>", "</think>"])
    vocab = tk.get_vocab_size(with_added_tokens=True)
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": chat_template, "eos_token": "<|im_end|>", "bos_token": None,
                   "add_bos_token": False}, f)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tk.token_to_id("<|im_end|>"), bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()

    def ids(text: str) -> list[int]:
        return tk.encode(text, add_special_tokens=False).ids

    chain = [ids("\n")[-1], *ids(REASONING), tk.token_to_id("</think>"), *ids(ANSWER), tk.token_to_id("<|im_end|>")]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.nn.functional.normalize(torch.randn(vocab, cfg.hidden_size), dim=-1) * 8.0
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.zeros(vocab, cfg.hidden_size)
        for cur, nxt in zip(chain, chain[1:]):
            head[nxt] += emb[cur] * 4.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path, safe_serialization=True)
    return path
