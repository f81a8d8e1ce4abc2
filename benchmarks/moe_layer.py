"""Tokens/s of one DeepSeekMoE layer's routed experts: shoal's grouped path vs per-expert and
per-token loops, at tiny-but-realistic shapes (DeepSeek-V2-Lite's 64 experts, top-6, scaled-down
widths). Results go into README, never into assertions.

    .venv/bin/python benchmarks/moe_layer.py [--hidden 512 --inter 256 --dtype float32 --threads 2]

- grouped: `FusedMoE` → `ops.moe_experts` (sort assignments by expert, one matmul pair per active
  expert over all its tokens, scatter-add back) — what the model runs.
- per-expert loop: the `transformers` reference style: for every expert, find its tokens with a
  one-hot mask, gather, compute, index-add.
- per-token loop: every token, every one of its k experts, one small matmul each.
Variants are run alternately and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from shoal.layers.moe import FusedMoE, select_experts


def per_expert_loop(x, ids, w, w13, w2):
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=w13.shape[0]).permute(2, 1, 0)  # [E, K, T]
    for e in range(w13.shape[0]):
        k_pos, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * w[tok, k_pos, None].to(x.dtype)
        out.index_add_(0, tok, y)
    return out


def per_token_loop(x, ids, w, w13, w2):
    out = torch.zeros_like(x)
    ids_l = ids.tolist()
    for t in range(x.shape[0]):
        for k, e in enumerate(ids_l[t]):
            gate, up = F.linear(x[t : t + 1], w13[e]).chunk(2, dim=-1)
            out[t] += (F.linear(F.silu(gate) * up, w2[e]) * w[t, k].to(x.dtype))[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    moe = FusedMoE(args.experts, args.hidden, args.inter).to(dtype)
    moe.w13.data.normal_(0, 0.05)
    moe.w2.data.normal_(0, 0.05)
    router = torch.randn(args.experts, args.hidden) * 0.05
    print(f"one MoE layer: {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, "
          f"expert intermediate {args.inter}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} {'grouped tok/s':>14} {'per-expert tok/s':>17} {'per-token tok/s':>16} {'speed-up vs loop':>17}")
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, args.hidden).to(dtype)
        w, ids = select_experts(x.float() @ router.t(), args.top_k, "softmax", "greedy")
        variants = {
            "grouped": lambda: moe(x, w, ids),
            "expert": lambda: per_expert_loop(x, ids, w, moe.w13, moe.w2),
            "token": lambda: per_token_loop(x, ids, w, moe.w13, moe.w2),
        }
        ref = variants["grouped"]()
        for name in ("expert", "token"):  # same maths, so the comparison is fair
            torch.testing.assert_close(variants[name](), ref, rtol=2e-2, atol=2e-3)
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        tps = {k: t / statistics.median(v) for k, v in times.items()}
        print(f"{t:>7} {tps['grouped']:>14,.0f} {tps['expert']:>17,.0f} {tps['token']:>16,.0f} "
              f"{tps['grouped'] / tps['expert']:>16.1f}x")


if __name__ == "__main__":
    main()
