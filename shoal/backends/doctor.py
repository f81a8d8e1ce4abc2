"""`shoal doctor`: what shoal sees on this machine and what it would do with it.

Every built-in platform in detection order and every `shoal.platforms` plug-in (loaded or
failed, with the reason), their devices and memory, dtypes, fp8, collective backend, graph
capture, KV block size/layout, which implementation each op uses, torch and vendor library
versions, and whether the default model loads and generates a token on the selected platform.
"""

from __future__ import annotations

import platform as _py
import sys
import time
from typing import Any

import torch

from shoal.backends import registry


def _gib(n: int | None) -> str:
    return "?" if not isinstance(n, int) else f"{n / 2**30:.1f} GiB"


def check_default_model(device: str | None) -> dict[str, Any]:
    """Load the default model on `device` and generate one token; never raises."""
    start = time.time()
    try:
        from shoal import LLM, SamplingParams
        from shoal.loader.source import default_model_path

        path = default_model_path()
        llm = LLM(model=None, device=device, progress=False, max_model_len=256, kv_cache_memory=64 * 2**20)
        out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=1))
        return {"ok": True, "path": path, "platform": llm.engine.platform.name,
                "token": out[0].outputs[0].token_ids, "seconds": round(time.time() - start, 1)}
    except Exception as exc:  # noqa: BLE001 — doctor reports, never crashes
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.time() - start, 1)}


def doctor_report(device: str | None = None, check_model: bool = True) -> dict[str, Any]:
    from shoal import __version__

    scan = registry.scan_plugins()
    report: dict[str, Any] = {
        "shoal": __version__,
        "python": _py.python_version(),
        "os": f"{_py.system()} {_py.release()} ({_py.machine()})",
        "torch": torch.__version__,
        "platforms": [],
        "plugins": [],
    }
    for p in scan.plugins:
        report["plugins"].append({"name": p.name, "entry_point": p.value, "dist": p.dist,
                                  "loaded": p.cls is not None, "error": p.error})
    plugin_names = set(scan.loaded)
    for name, cls in registry.all_platforms().items():
        try:
            info = cls().describe()
        except Exception as exc:  # noqa: BLE001
            info = {"name": name, "available": False, "reason": f"failed to start: {type(exc).__name__}: {exc}"}
        info["name"] = name
        info["source"] = "plug-in" if name in plugin_names else "built-in"
        report["platforms"].append(info)
    try:
        selected = registry.resolve_platform(device)
        report["selected"] = selected.name
    except Exception as exc:  # noqa: BLE001
        report["selected"] = None
        report["selected_error"] = str(exc)
    if check_model:
        report["default_model"] = (check_default_model(device) if report["selected"] is not None
                                   else {"ok": False, "error": "no usable platform for --device"})
    return report


def format_report(r: dict[str, Any]) -> str:
    lines = [f"shoal {r['shoal']} — python {r['python']}, torch {r['torch']}, {r['os']}", ""]
    lines.append("platforms (detection order; plug-ins first; * = what --device auto selects):")
    for p in r["platforms"]:
        mark = "*" if p["name"] == r.get("selected") else " "
        src = "" if p.get("source") == "built-in" else f" [{p.get('source')}]"
        if not p.get("available"):
            lines.append(f" {mark} {p['name']:6}{src} not available: {p.get('reason')}")
            continue
        lines.append(f" {mark} {p['name']:6}{src} available")
        for d in p.get("devices", []):
            lines.append(f"      device {d['index']}: {d['name']}, memory {_gib(d['memory_free'])} free of "
                         f"{_gib(d['memory_total'])}")
        lines.append(f"      dtypes {', '.join(p.get('dtypes', []))} (default {p.get('default_dtype')}), "
                     f"fp8 {'yes' if p.get('fp8') is True else 'no'}, collectives {p.get('dist_backend')}, "
                     f"graph capture {p.get('graph_capture') or 'none'}")
        lines.append(f"      KV cache: {p.get('kv_block_size')}-token blocks, {p.get('kv_layout')} layout, default "
                     f"budget {_gib(p.get('kv_cache_default_bytes'))}")
        libs = p.get("library_versions")
        if isinstance(libs, dict):
            lines.append("      libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()))
        ops = p.get("op_sources")
        if isinstance(ops, dict):
            lines.append("      ops: " + ", ".join(f"{k}={v}" for k, v in ops.items()))
        kern = p.get("op_kernels")
        if isinstance(kern, dict) and kern:
            lines.append("      kernels:")
            lines.extend(f"        {k}: {v}" for k, v in kern.items())
    lines.append("")
    if r["plugins"]:
        lines.append("plug-ins (entry-point group shoal.platforms):")
        for p in r["plugins"]:
            src = f", from {p['dist']}" if p.get("dist") else ""
            state = "loaded" if p["loaded"] else f"FAILED to load: {p['error']}"
            lines.append(f"    {p['name']} ({p['entry_point']}{src}): {state}")
    else:
        lines.append("plug-ins (entry-point group shoal.platforms): none installed")
    if r.get("selected_error"):
        lines.append(f"--device: {r['selected_error']}")
    dm = r.get("default_model")
    if dm is not None:
        lines.append("")
        if dm["ok"]:
            lines.append(f"default model: loads on {dm['platform']} and generates ({dm['path']}, {dm['seconds']} s)")
        else:
            lines.append(f"default model: does NOT load: {dm['error']}")
    return "\n".join(lines)


def doctor_exit_code(r: dict[str, Any]) -> int:
    """0 when the selected platform works and (if checked) the default model loads."""
    if r.get("selected") is None:
        return 1
    dm = r.get("default_model")
    return 0 if dm is None or dm["ok"] else 1


if __name__ == "__main__":  # python -m shoal.backends.doctor
    rep = doctor_report()
    print(format_report(rep))
    sys.exit(doctor_exit_code(rep))
