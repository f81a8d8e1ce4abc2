"""Multi-Token Prediction modules (DeepSeek-V3 §2.2).

Proves: (1) a checkpoint whose config names MTP layers but ships none (as `transformers` saves)
loads without them, with one notice; (2) MTP weights stored as DeepSeek-V3 stores them (layer N,
i.e. `model.layers.{num_hidden_layers}.{enorm,hnorm,eh_proj,embed_tokens,shared_head.*}` plus a
full decoder block with routed experts) load, and shoal's next-next-token logits for a mixed-length
batch through the paged cache match the same computation done with `transformers`' own modules:
Head(Norm(Block(W_eh [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]))), h_i = the main model's final hidden state.
"""

from __future__ import annotations

import json
import logging
import random

import torch
from safetensors.torch import load_file, save_file

from tests.parity.ds_utils import PagedHarness, hf_model, make_deepseek, one_thread, shoal_model  # noqa: F401


def test_config_with_mtp_but_no_weights_loads_without_them(tmp_path, caplog):
    path = make_deepseek(tmp_path / "v3", "v3")
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with caplog.at_level(logging.WARNING, logger="shoal"):
        model = shoal_model(path)
    assert len(model.mtp) == 0
    notices = [r for r in caplog.records if "MTP" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()


def _with_mtp_weights(tmp_path):
    """The tiny V3 checkpoint plus random layer-N MTP weights; returns (dir, reference MTP modules)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    path = make_deepseek(tmp_path / "v3mtp", "v3")
    ref = hf_model(path)
    cfg, n, d = ref.config, ref.config.num_hidden_layers, ref.config.hidden_size
    torch.manual_seed(7)
    block = DeepseekV3DecoderLayer(cfg, n).eval()
    mods = {
        "block": block, "enorm": DeepseekV3RMSNorm(d, cfg.rms_norm_eps), "hnorm": DeepseekV3RMSNorm(d, cfg.rms_norm_eps),
        "eh_proj": torch.nn.Linear(2 * d, d, bias=False), "embed": torch.nn.Embedding(cfg.vocab_size, d),
        "norm": DeepseekV3RMSNorm(d, cfg.rms_norm_eps), "head": torch.nn.Linear(d, cfg.vocab_size, bias=False),
    }
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 0.25) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        block.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
        for k in ("enorm", "hnorm", "norm"):
            mods[k].weight.uniform_(0.5, 1.5)
        for k in ("eh_proj", "embed", "head"):
            mods[k].weight.normal_(0, 0.25)
    sd = load_file(path / "model.safetensors")
    p = f"model.layers.{n}."
    # the block in the checkpoint's per-expert names, as DeepSeek and transformers store it
    e = block.mlp.experts
    for i in range(e.num_experts):
        gate, up = e.gate_up_proj[i].chunk(2, dim=0)
        sd[f"{p}mlp.experts.{i}.gate_proj.weight"] = gate
        sd[f"{p}mlp.experts.{i}.up_proj.weight"] = up
        sd[f"{p}mlp.experts.{i}.down_proj.weight"] = e.down_proj[i]
    for name, t in block.state_dict().items():
        if not name.startswith("mlp.experts."):
            sd[p + name] = t
    sd.update({p + "enorm.weight": mods["enorm"].weight, p + "hnorm.weight": mods["hnorm"].weight,
               p + "eh_proj.weight": mods["eh_proj"].weight, p + "embed_tokens.weight": mods["embed"].weight,
               p + "shared_head.norm.weight": mods["norm"].weight, p + "shared_head.head.weight": mods["head"].weight})
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path, ref, mods


@torch.no_grad()
def test_mtp_weights_load_and_logits_match_reference_modules(tmp_path):
    path, ref, mods = _with_mtp_weights(tmp_path)
    model = shoal_model(path)
    assert len(model.mtp) == 1
    model.enable_mtp_cache()
    rng = random.Random(0)
    prompts = [[rng.randrange(8, 256) for _ in range(k)] for k in (6, 19, 33)]
    nxt = [[rng.randrange(8, 256)] for _ in prompts]  # the token after each prompt (e.g. just sampled)
    h = PagedHarness(model, len(prompts))
    _, fb, hidden = h.step(dict(enumerate(prompts)))
    next_ids = torch.tensor([t for p, x in zip(prompts, nxt) for t in p[1:] + x])
    got = model.compute_mtp_logits(model.forward_mtp(fb, hidden, next_ids))
    start = 0
    for p, x in zip(prompts, nxt):
        ids, L = torch.tensor([p]), len(p)
        h_main = ref.model(ids).last_hidden_state  # [1, L, D], after the final norm
        e = mods["embed"](torch.tensor([p[1:] + x]))
        e[:, 0] = 0  # position 0 has no previous token to pair with
        xin = mods["eh_proj"](torch.cat([mods["enorm"](e), mods["hnorm"](h_main)], dim=-1))
        pos = torch.arange(L)[None]
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        out = mods["block"](xin, attention_mask=mask, position_ids=pos,
                            position_embeddings=ref.model.rotary_emb(xin, pos))
        expect = mods["head"](mods["norm"](out))[0]
        diff = (got[start : start + L] - expect).abs().max().item()
        assert diff <= 1e-4, f"prompt len {L}: MTP logits max abs diff {diff:.2e}"
        start += L
