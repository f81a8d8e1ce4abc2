"""`make bench`: every benchmark in one run, results to benchmarks/results/ (JSON + Markdown).

1. membw.py — memory read bandwidth and the decode speed of light;
2. the engine comparison: shoal, llama.cpp (llama-cpp-python), transformers bf16 and vLLM's CPU
   build, each in its own process (and venv), for `--rounds` rounds in alternating order (the order
   reverses every round so no engine always runs first or last); each process measures batch-1
   prefill 512 / decode 128 and the throughput recipe, reporting medians of `--runs`; the table
   takes the median over rounds and the ratio to llama.cpp. The load average (`uptime`) is recorded
   before and after each process — numbers taken above ~1.5 on a 2-core machine are not comparable;
3. the other benchmark scripts in this folder (perplexity vs llama.cpp, planner sweep, MoE layer), if present.

Peers that are not set up (benchmarks/peers/setup_*.sh) are reported as missing, not failed.

`--isa avx2` measures every engine as an AVX2-only CPU would run it, on a CPU that has more: shoal's
kernels capped at their avx2 tier (SHOAL_CPU_ISA=avx2), torch's own kernels and oneDNN capped too
(ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2), and llama.cpp built without AVX-512
(`LLAMACPP_ISA=avx2 benchmarks/peers/setup_llamacpp.sh`). The engine `shoal-generic` is shoal on its
portable-C tier (SHOAL_CPU_ISA=generic).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import PREFILL_REPEATS, VENVS, median  # noqa: E402

SHOAL_PY = ROOT / ".venv" / "bin" / "python"
ENGINES = {
    "shoal": (SHOAL_PY, HERE / "peers" / "bench_shoal.py"),
    "shoal-generic": (SHOAL_PY, HERE / "peers" / "bench_shoal.py"),
    "llama.cpp": (VENVS / "llamacpp" / "bin" / "python", HERE / "peers" / "bench_llamacpp.py"),
    "transformers": (SHOAL_PY, HERE / "peers" / "bench_transformers.py"),
    "vllm": (VENVS / "vllm" / "bin" / "python", HERE / "peers" / "bench_vllm.py"),
}
OTHER_SCRIPTS = ["ppl.py", "planner_sweep.py", "moe_layer.py"]


def loadavg() -> float:
    return os.getloadavg()[0]


# the capped runs compile into their own inductor cache: torch's cache key does not include
# ATEN_CPU_CAPABILITY, and artifacts built under the cap broke uncapped processes afterwards
ISA_ENV = {"native": {}, "avx2": {"SHOAL_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                  "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_shoal_avx2"}}


def engine_env(name: str, isa: str) -> dict[str, str]:
    env = dict(os.environ) | ISA_ENV[isa]
    if name == "shoal-generic":
        env["SHOAL_CPU_ISA"] = "generic"
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_shoal_generic")
    return env


def engine_python(name: str, isa: str) -> Path:
    py = ENGINES[name][0]
    if name == "llama.cpp" and isa == "avx2" and (VENVS / "llamacpp-avx2").exists():
        return VENVS / "llamacpp-avx2" / "bin" / "python"
    return py


def run(py: Path, script: Path, args: list[str], timeout: int, env: dict[str, str] | None = None) -> dict:
    before = loadavg()
    try:
        p = subprocess.run([str(py), str(script), *args], capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s", "load_before": before, "load_after": loadavg()}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}", "load_before": before,
                "load_after": loadavg()}
    res = json.loads(lines[-1][len("RESULT "):])
    res.update(load_before=before, load_after=loadavg())
    return res


def machine() -> dict:
    info = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def fmt(x: float | None, nd: int = 0) -> str:
    return "—" if x is None or x != x else f"{x:,.{nd}f}"


def markdown(summary: dict) -> str:
    rows = summary["engines"]
    ref = rows.get("llama.cpp", {})
    lines = [
        f"Measured {summary['date']} on {summary['machine'].get('cpu', '?')}, {summary['machine']['cores']} cores, "
        f"{summary['threads']} threads, ISA {summary.get('isa', 'native')}, default model (SmolLM2-135M-Instruct Q4_1 GGUF); medians of "
        f"{summary['runs']} runs × {summary['rounds']} alternating rounds (a prefill run: {PREFILL_REPEATS} "
        "back-to-back requests); "
        "load average per engine in the last column.",
        "",
        "| engine | prefill 512 (tok/s) | decode b=1 (tok/s) | throughput `" + summary["recipe"] + "` (out tok/s) "
        "| decode vs llama.cpp | prefill vs llama.cpp | throughput vs llama.cpp | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | — | — | — | — | — | — | {r['error'][:80]} |")
            continue

        def ratio(key: str) -> str:
            return f"{r[key] / ref[key]:.2f}×" if ref.get(key) else "—"
        lines.append(f"| {name} | {fmt(r['prefill_tok_s'])} | {fmt(r['decode_tok_s'], 1)} | "
                     f"{fmt(r['throughput_tok_s'])} | {ratio('decode_tok_s')} | {ratio('prefill_tok_s')} | "
                     f"{ratio('throughput_tok_s')} | {r.get('loads', '')} |")
    m = summary.get("membw") or {}
    if "read_bandwidth_gb_s" in m:
        lines += ["", f"Memory read bandwidth {m['read_bandwidth_gb_s']:.1f} GB/s → batch-1 decode speed of light "
                      f"{m['speed_of_light_gguf_tok_s']:.0f} tok/s for the GGUF's "
                      f"{m['gguf_weight_bytes'] / 1e6:.1f} MB "
                      f"({m['speed_of_light_shoal_tok_s']:.0f} tok/s for shoal's packed "
                      f"{m['shoal_decode_bytes'] / 1e6:.1f} MB)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--recipe", default="ci", choices=["ci", "nano"])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--skip-others", action="store_true", help="only the engine comparison")
    ap.add_argument("--isa", default="native", choices=list(ISA_ENV),
                    help="avx2: every engine as on an AVX2-only CPU (see the module docstring)")
    a = ap.parse_args()
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M") + ("" if a.isa == "native" else f"_{a.isa}")
    summary: dict = {"date": dt.datetime.now().isoformat(timespec="minutes"), "machine": machine(), "threads": 2,
                     "runs": a.runs, "rounds": a.rounds, "recipe": a.recipe, "isa": a.isa, "raw": {}, "engines": {}}
    print("membw …", flush=True)
    summary["membw"] = run(SHOAL_PY, HERE / "membw.py", [], 600)
    names = [n for n in a.engines.split(",") if n in ENGINES]
    for rnd in range(a.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            py, script = engine_python(name, a.isa), ENGINES[name][1]
            if not py.exists():
                missing = {"error": f"not set up ({py} missing; see benchmarks/peers/)"}
                summary["raw"].setdefault(name, []).append(missing)
                continue
            print(f"round {rnd + 1}: {name} (load {loadavg():.2f}) …", flush=True)
            extra = ["--dtype", "float32"] if name == "transformers" and a.isa == "avx2" else []  # no fast bf16 there
            res = run(py, script, ["--runs", str(a.runs), "--recipe", a.recipe, *extra], a.timeout,
                      engine_env(name, a.isa))
            print(f"  {json.dumps({k: v for k, v in res.items() if not k.endswith('_runs')})[:400]}", flush=True)
            summary["raw"].setdefault(name, []).append(res)
    for name, results in summary["raw"].items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            summary["engines"][name] = {"error": results[-1]["error"]}
            continue
        summary["engines"][name] = {
            key: median([r[key] for r in ok]) for key in ("prefill_tok_s", "decode_tok_s", "throughput_tok_s")
        } | {"loads": ", ".join(f"{r['load_before']:.1f}→{r['load_after']:.1f}" for r in ok),
             "config": ok[-1].get("config", "")}
    if not a.skip_others:
        for script in OTHER_SCRIPTS:
            if (HERE / script).exists():
                print(f"{script} …", flush=True)
                p = subprocess.run([str(SHOAL_PY), str(HERE / script)], capture_output=True, text=True, cwd=ROOT)
                summary.setdefault("others", {})[script] = {"exit": p.returncode, "stdout": p.stdout[-4000:]}
    md = markdown(summary)
    (out_dir / f"{stamp}.json").write_text(json.dumps(summary, indent=1))
    (out_dir / f"{stamp}.md").write_text(md)
    (out_dir / "latest.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
