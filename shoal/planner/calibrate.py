"""Fit a chip's efficiency factors from `shoal bench` results measured on it.

Input: a JSON list of records (or {"results": [...]}) with fields
  chip, model, precision, n_dev, tp (1), ep (1), isl, osl, batch (or concurrency),
  prefill_tok_s_per_dev and/or decode_tok_s_per_dev (measured), optional kv_dtype, mtp.
Raw `shoal bench serve --json` results are accepted too when chip/model/n_dev/isl/osl/concurrency
are added: `tpot_ms.mean` becomes a decode TPOT row and `total_token_throughput_tok_s` (with
`num_prompts`) a colocated row. Each measured number becomes one measurement row. The fit scales the chip's
GEMM, attention and memory efficiencies by common factors found by grid search on
mean |log(predicted / measured)| (robust to a bad point), and writes a chip overlay JSON that
`--chips FILE` reads back.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

from .chips import Catalog
from .validate import log_loss as _loss

SCALES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)


def records_to_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for i, r in enumerate(records):
        base = {
            "id": str(r.get("id", f"R{i + 1}")), "src": "bench", "chip": str(r["chip"]), "model": str(r["model"]),
            "n_dev": str(r.get("n_dev", 1)), "tp": str(r.get("tp", 1)), "ep": str(r.get("ep", 1)),
            "precision": str(r.get("precision", "bf16")), "kv_dtype": str(r.get("kv_dtype", "bf16")),
            "attn_precision": str(r.get("attn_precision", "") or ""), "mtp": str(r.get("mtp", 0)),
            "mtp_accept": str(r.get("mtp_accept", "") or ""), "predict": "Y",
        }
        batch = r.get("batch", r.get("concurrency", 1))
        isl, osl = int(r.get("isl", 128)), int(r.get("osl", 128))
        if r.get("prefill_tok_s_per_dev"):
            rows.append({**base, "id": base["id"] + "-prefill", "mode": "prefill", "isl": str(isl), "conc": str(batch),
                         "metric": "prefill_tok_s_per_dev", "value": str(r["prefill_tok_s_per_dev"])})
        if r.get("decode_tok_s_per_dev"):
            rows.append({**base, "id": base["id"] + "-decode", "mode": "decode", "ctx": str(isl + osl / 2),
                         "conc": str(batch), "metric": "decode_tok_s_per_dev", "value": str(r["decode_tok_s_per_dev"])})
        # raw `shoal bench serve --json` output (plus chip/model/n_dev/...): use its mean TPOT at the
        # stated concurrency, and its total throughput as a colocated run of `num_prompts` requests
        tp_ms = r.get("tpot_ms")
        if isinstance(tp_ms, dict):
            tp_ms = tp_ms.get("mean")
        if tp_ms and not r.get("decode_tok_s_per_dev"):
            rows.append({**base, "id": base["id"] + "-tpot", "mode": "decode", "ctx": str(isl + osl / 2),
                         "conc": str(batch), "metric": "tpot_ms", "value": str(tp_ms)})
        tot = r.get("total_token_throughput_tok_s")
        if tot and r.get("num_prompts"):
            rows.append({**base, "id": base["id"] + "-total", "mode": "colocated", "isl": str(isl), "osl": str(osl),
                         "conc": str(r["num_prompts"]), "metric": "total_tok_s_per_dev",
                         "value": str(float(tot) / int(r.get("n_dev", 1)))})
    return rows


def calibrate(records: list[dict[str, Any]], cat: Catalog) -> dict[str, Any]:
    """Returns the overlay dict {"chips": [{"id", "efficiency": {...}}], "report": {...}}."""
    rows = records_to_rows(records)
    out: dict[str, Any] = {"schema": "shoal.planner.chips/1", "chips": [], "report": {}}
    for chip_name in sorted({r["chip"] for r in rows}):
        chip = cat.get(chip_name)
        chip_rows = [r for r in rows if r["chip"] == chip_name]
        base = cat.efficiency_for(chip)
        before, n = _loss(chip_rows, cat)
        best = (before, 1.0, 1.0)
        saved = copy.deepcopy(chip.efficiency)
        for sc, sm in itertools.product(SCALES, SCALES):
            chip.efficiency = {**saved, "gemm": {k: v * sc for k, v in base["gemm"].items()},
                               "attn": base["attn"] * sc, "mem": min(1.0, base["mem"] * sm)}
            lv, _ = _loss(chip_rows, cat)
            if lv < best[0] - 1e-12:
                best = (lv, sc, sm)
        _, sc, sm = best
        eff = {"gemm": {k: round(v * sc, 4) for k, v in base["gemm"].items()}, "attn": round(base["attn"] * sc, 4),
               "mem": round(min(1.0, base["mem"] * sm), 4), "src": "shoal plan calibrate", "n_points": n}
        chip.efficiency = {**saved, **{k: v for k, v in eff.items() if k not in ("src", "n_points")}}
        out["chips"].append({"id": chip.id, "efficiency": eff})
        out["report"][chip.id] = {"points": n, "mean_abs_log_error_before": before, "mean_abs_log_error_after": best[0],
                                  "compute_scale": sc, "memory_scale": sm}
    return out


def load_records(path: str | Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("results") or data.get("records") or [data]
    return list(data)
