"""Pareto plot (tokens/s per chip vs tokens/s per user); matplotlib is imported only here."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_pareto(plans: list[Any], out: str | Path, title: str = "", tpot_ms: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for plan in plans:
        pts = plan.pareto
        if not pts:
            continue
        xs = [p.tok_s_per_user for p in pts]
        ys = [p.tok_s_per_dev for p in pts]
        (line,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.5, label=plan.chip.name)
        if plan.decode:
            ax.plot([plan.decode.tok_s_per_user], [plan.decode.tok_s_per_dev], marker="*", ms=13,
                    color=line.get_color(), markeredgecolor="black")
    if tpot_ms:
        ax.axvline(1000.0 / tpot_ms, color="grey", ls="--", lw=1)
        ax.text(1000.0 / tpot_ms, ax.get_ylim()[1] * 0.95, f" TPOT {tpot_ms:g} ms", color="grey", fontsize=8, va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s per user")
    ax.set_ylabel("decode tokens/s per chip")
    ax.set_title(title or "Pareto front (star = best config meeting the TPOT target)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
