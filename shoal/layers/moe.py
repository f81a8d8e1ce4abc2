"""DeepSeekMoE routing and fused routed experts.

`select_experts` is the gate's routing function (DeepSeek-V2 §2.2, V3 §2.1.2): score every routed
expert (softmax for V2, sigmoid for V3), optionally keep only the `topk_group` best of `n_group`
expert groups (V2: group score = its best expert; V3 `noaux_tc`: sum of its two best, after adding
the load-balancing `e_score_correction_bias`), take the top-k experts, and weight them by their
*uncorrected* scores (renormalised if `norm_topk_prob`) times `routed_scaling_factor`. It uses the
same torch ops in the same order as the reference, so ties are broken the same way.

`FusedMoE` holds all routed experts as two stacked tensors, `w13` [E, 2I, D] (gate and up
projections) and `w2` [E, D, I], filled from the per-expert checkpoint names, and computes them
through `ops.moe_experts` (tokens grouped per expert, one matmul pair per active expert).
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends import ops
from shoal.distributed import tp_group


def select_experts(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    scoring_func: str = "softmax",
    topk_method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: torch.Tensor | None = None,  # [E], used for selection only
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, K] float32, ids [T, K] long
    logits = router_logits.float()
    if scoring_func == "softmax":
        scores = logits.softmax(dim=-1, dtype=torch.float32)
    elif scoring_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unsupported MoE scoring_func {scoring_func!r} (supported: softmax, sigmoid)")
    t, e = scores.shape
    if topk_method == "noaux_tc":
        choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
        group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        choice = _keep_groups(choice, group_scores, n_group, topk_group, fill=float("-inf"))
        ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
    elif topk_method == "group_limited_greedy" and n_group > 1:
        group_scores = scores.view(t, n_group, e // n_group).max(dim=-1).values  # [T, G]
        masked = _keep_groups(scores, group_scores, n_group, topk_group, fill=0.0)
        weights, ids = torch.topk(masked, k=top_k, dim=-1, sorted=False)
    elif topk_method in ("greedy", "group_limited_greedy"):
        weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    else:
        raise ValueError(f"unsupported MoE topk_method {topk_method!r} (supported: greedy, group_limited_greedy, noaux_tc)")
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def _keep_groups(scores: torch.Tensor, group_scores: torch.Tensor, n_group: int, topk_group: int,
                 fill: float) -> torch.Tensor:
    """Scores with every expert outside the `topk_group` best groups set to `fill`."""
    t, e = scores.shape
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    return scores.masked_fill(~score_mask.bool(), fill)


class FusedMoE(nn.Module):
    """All routed experts of one layer; intermediate size split across tensor-parallel ranks (the
    caller all-reduces the partial sums once, together with the shared experts')."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.tp = tp_group()
        if intermediate_size % self.tp.size:
            raise ValueError(f"moe_intermediate_size {intermediate_size} not divisible by tensor-parallel size {self.tp.size}")
        self.num_experts = num_experts
        self.intermediate = intermediate_size // self.tp.size  # per rank
        i = self.intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * i, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, i), requires_grad=False)
        self._loaded = torch.zeros(num_experts, 3, dtype=torch.bool, device="cpu")

    def load_expert(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        """Copy `experts.{expert}.{gate_proj|up_proj|down_proj}.weight` into its slice."""
        i, r = self.intermediate, self.tp.rank
        with torch.no_grad():
            if proj == "down_proj":
                dst, src, slot = self.w2.data[expert], tensor.narrow(1, r * i, i), 2
            else:
                part = 0 if proj == "gate_proj" else 1
                dst, src, slot = self.w13.data[expert, part * i : (part + 1) * i], tensor.narrow(0, r * i, i), part
            if dst.shape != src.shape:
                raise ValueError(
                    f"shape mismatch loading experts.{expert}.{proj}: checkpoint {tuple(tensor.shape)} "
                    f"vs model slice {tuple(dst.shape)}"
                )
            dst.copy_(src)
        self._loaded[expert, slot] = True

    def fully_loaded(self) -> tuple[bool, bool]:
        """(every w13 slice loaded, every w2 slice loaded)."""
        return bool(self._loaded[:, :2].all()), bool(self._loaded[:, 2].all())

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # x [T, D] → [T, D] partial sums on this rank
        return ops.moe_experts(x, topk_ids, topk_weights, self.w13, self.w2)
