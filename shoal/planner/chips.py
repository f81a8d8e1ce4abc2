"""Chip catalog (data/chips.json) and efficiency factors (data/efficiency.json).

Every catalog number is stored as {"value", "src", "conf", "note"}; unknown values are null and
stay null. Users add or override chips with their own JSON file of the same shape (`--chips FILE`),
which may also carry per-chip `efficiency` blocks (that is what `shoal plan calibrate` writes).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
CHIPS_FILE = DATA_DIR / "chips.json"
EFFICIENCY_FILE = DATA_DIR / "efficiency.json"

NUMERIC_FIELDS = (
    "bf16_tflops", "fp8_tflops", "int8_tops", "fp4_tflops", "mem_gb", "mem_bw_tbs", "scaleup_gbs",
    "scaleup_domain", "scaleout_gbs", "ep_rdma_gbs", "tdp_w", "rent_usd_hr", "price_usd",
)


class UnknownValue(LookupError):
    """A number the prediction needs is unknown in the catalog."""


@dataclass
class Chip:
    id: str
    name: str
    vendor: str
    kind: str  # gpu | npu | cpu
    eff_family: str
    raw: dict[str, Any]
    aliases: tuple[str, ...] = ()
    efficiency: dict[str, Any] = field(default_factory=dict)  # per-chip overrides (calibration)

    def v(self, key: str) -> float | None:
        d = self.raw.get(key)
        if isinstance(d, dict):
            return d.get("value")
        return d

    def need(self, key: str) -> float:
        x = self.v(key)
        if x is None:
            note = (self.raw.get(key) or {}).get("note", "unknown") if isinstance(self.raw.get(key), dict) else "unknown"
            raise UnknownValue(f"{self.id}: {key} is unknown ({note})")
        return float(x)

    def source(self, key: str) -> str:
        d = self.raw.get(key)
        if isinstance(d, dict) and d.get("value") is not None:
            return f"{d.get('src', '?')}/{d.get('conf', '?')}"
        return "unknown"

    def peak_tflops(self, precision: str) -> tuple[float | None, str]:
        """Dense matrix peak used for GEMMs at `precision`; returns (TFLOPS or None, note)."""
        order = {
            "bf16": ["bf16_tflops"],
            "fp16": ["bf16_tflops"],
            "fp8": ["fp8_tflops", "bf16_tflops"],
            "int8": ["int8_tops", "bf16_tflops"],
            "int4": ["bf16_tflops"],  # weight-only int4 dequantises to bf16 compute
            "fp4": ["fp4_tflops", "fp8_tflops", "bf16_tflops"],
        }[precision]
        for i, k in enumerate(order):
            x = self.v(k)
            if x is not None:
                note = "" if i == 0 else f"{precision} computed at the {k.split('_')[0]} peak ({order[0]} unknown)"
                return float(x), note
        return None, f"no matrix peak known for {precision}"


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


class Catalog:
    def __init__(self, chips: list[Chip], efficiency: dict[str, Any]):
        self.chips = {c.id: c for c in chips}
        self.efficiency = efficiency
        self._alias: dict[str, str] = {}
        for c in chips:
            for a in (c.id, c.name, *c.aliases):
                self._alias[_norm(a)] = c.id

    @classmethod
    def load(cls, overlays: list[str | Path] | None = None, efficiency_file: str | Path | None = None) -> "Catalog":
        base = _load_json(CHIPS_FILE)["chips"]
        eff = _load_json(Path(efficiency_file) if efficiency_file else EFFICIENCY_FILE)
        by_id: dict[str, dict[str, Any]] = {c["id"]: copy.deepcopy(c) for c in base}
        for ov in overlays or []:
            data = _load_json(Path(ov))
            for c in data.get("chips", []):
                cur = by_id.setdefault(c["id"], {"id": c["id"], "name": c.get("name", c["id"]), "vendor": c.get("vendor", "?"),
                                                 "kind": c.get("kind", "gpu"), "eff_family": c.get("eff_family", "generic"),
                                                 "aliases": []})
                for k, val in c.items():
                    if k == "efficiency":
                        cur.setdefault("efficiency", {}).update(val)
                    elif k in NUMERIC_FIELDS and not isinstance(val, dict):
                        cur[k] = {"value": val, "src": "user", "conf": "user"}
                    else:
                        cur[k] = val
            if "global" in data:
                eff = copy.deepcopy(eff)
                eff["global"].update(data["global"])
        chips = [
            Chip(id=c["id"], name=c.get("name", c["id"]), vendor=c.get("vendor", "?"), kind=c.get("kind", "gpu"),
                 eff_family=c.get("eff_family", "generic"), raw=c, aliases=tuple(c.get("aliases", ())),
                 efficiency=c.get("efficiency", {}))
            for c in by_id.values()
        ]
        return cls(chips, eff)

    def get(self, name: str) -> Chip:
        key = _norm(name)
        if key in self._alias:
            return self.chips[self._alias[key]]
        raise KeyError(f"unknown chip {name!r}; known: {', '.join(sorted(self.chips))}")

    def efficiency_for(self, chip: Chip) -> dict[str, Any]:
        """Merged efficiency: global knobs + family factors + per-chip overrides."""
        fam = self.efficiency["families"].get(chip.eff_family) or self.efficiency["families"]["generic"]
        out: dict[str, Any] = {k: v for k, v in self.efficiency["global"].items() if k not in ("src", "fitted_on")}
        out.update({k: v for k, v in fam.items() if k not in ("src", "conf")})
        out["gemm"] = dict(fam["gemm"])
        for k, val in chip.efficiency.items():
            if k == "gemm" and isinstance(val, dict):
                out["gemm"].update(val)
            elif k not in ("src", "fitted_on", "n_points"):
                out[k] = val
        return out


def _norm(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())
