"""Third-party platforms through the `shoal.platforms` entry-point group, without editing shoal.

A fake vendor package is written into a temporary site directory with a `*.dist-info` declaring
its entry point; subprocesses run shoal with that directory on PYTHONPATH. Proves: the plug-in is
discovered and auto-selected, its op override is what the engine calls during a generation,
`shoal doctor` lists it, `shoal conformance` runs on it; a plug-in that raises on import is
reported by name while shoal falls back to the CPU, and asking for it by name stops with that
message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKECHIP = '''
"""A pretend accelerator: runs on the CPU, overrides rms_norm with a counting wrapper."""
from shoal.backends.cpu import CpuPlatform
from shoal.backends.native import NATIVE_OPS

CALLS = {"rms_norm": 0}


def counting_rms_norm(x, weight, eps):
    CALLS["rms_norm"] += 1
    return NATIVE_OPS["rms_norm"](x, weight, eps)


class FakeChipPlatform(CpuPlatform):
    name = "fakechip"
    op_overrides = {"rms_norm": counting_rms_norm}

    def device_name(self, index=None):
        return "FakeChip 9000"
'''

BROKEN = '''
raise RuntimeError("driver exploded while probing /dev/fake0")
'''


def _dist(site: Path, name: str, module_src: str, entry: str) -> None:
    (site / name).mkdir()
    (site / name / "__init__.py").write_text(module_src)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[shoal.platforms]\n{name} = {entry}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    _dist(site, "fakechip", FAKECHIP, "fakechip:FakeChipPlatform")
    return site


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("broken_site")
    _dist(site, "brokenchip", BROKEN, "brokenchip:BrokenPlatform")
    return site


def _run(site: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), TOKENIZERS_PARALLELISM="false")
    env.pop("SHOAL_DEVICE", None)
    env.pop("SHOAL_PLUGINS", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_plugin_is_discovered_selected_and_its_override_used(site, tmp_path):
    script = textwrap.dedent(f'''
        from pathlib import Path
        import logging; logging.disable(logging.WARNING)
        from shoal.backends import registry
        from shoal.backends.conformance.tiny_models import make_tiny
        from shoal import LLM, SamplingParams
        import fakechip

        scan = registry.scan_plugins()
        print("PLUGINS", sorted(scan.loaded), [p.error for p in scan.failed])
        model = make_tiny("llama", Path({str(tmp_path)!r}) / "llama", seed=0)
        llm = LLM(model=str(model), dtype="float32", progress=False, max_model_len=128)  # --device auto
        print("ENGINE", llm.engine.platform.name, type(llm.engine.platform).__module__)
        before = fakechip.CALLS["rms_norm"]
        out = llm.generate([{{"prompt_token_ids": [5, 6, 7]}}], SamplingParams(temperature=0, max_tokens=4))
        print("TOKENS", len(out[0].outputs[0].token_ids))
        print("CALLS", fakechip.CALLS["rms_norm"] - before)
        explicit = LLM(model=str(model), device="fakechip", dtype="float32", progress=False, max_model_len=128)
        print("EXPLICIT", explicit.engine.platform.name)
    ''')
    res = _run(site, ["-c", script])
    assert res.returncode == 0, res.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert out["PLUGINS"] == "['fakechip'] []"
    assert out["ENGINE"] == "fakechip fakechip"
    assert out["TOKENS"] == "4"
    # 2 layers × 2 norms + the final norm, per forward pass; 4 passes (prefill + 3 decodes)
    assert int(out["CALLS"]) == 4 * 5, res.stdout
    assert out["EXPLICIT"] == "fakechip"


def test_doctor_lists_the_plugin_and_its_override(site):
    res = _run(site, ["-m", "shoal", "doctor", "--skip-model"])
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert " * fakechip [plug-in] available" in out  # plug-ins come first and are selected
    assert "FakeChip 9000" in out
    assert "rms_norm=fakechip.counting_rms_norm" in out and "rotary=native" in out
    assert "fakechip (fakechip:FakeChipPlatform, from fakechip): loaded" in out


def test_conformance_runs_on_the_plugin(site, tmp_path):
    res = _run(site, ["-m", "shoal", "conformance", "--device", "fakechip", "--ops", "rms_norm",
                      "--dtype", "float32", "--skip-e2e", "--report", str(tmp_path / "fakechip.md")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    md = (tmp_path / "fakechip.md").read_text()
    assert "# shoal conformance: fakechip" in md and "fakechip.counting_rms_norm" in md
    assert "PASS on fakechip (FakeChip 9000)" in md


def test_broken_plugin_is_named_and_shoal_falls_back_to_cpu(broken_site):
    res = _run(broken_site, ["-m", "shoal", "doctor", "--skip-model"])
    assert res.returncode == 0, res.stderr[-3000:]
    msg = "brokenchip (brokenchip:BrokenPlatform, from brokenchip): FAILED to load: " \
          "RuntimeError: driver exploded while probing /dev/fake0"
    assert msg in res.stdout
    assert " * cpu " in res.stdout
    # the warning at start-up names the plug-in too
    assert "platform plug-in 'brokenchip'" in res.stderr and "continuing without it" in res.stderr


def test_asking_for_a_broken_plugin_stops_with_its_error(broken_site):
    res = _run(broken_site, ["-m", "shoal", "conformance", "--device", "brokenchip", "--skip-e2e"])
    assert res.returncode == 1
    assert ("shoal: error: platform plug-in 'brokenchip' (brokenchip:BrokenPlatform, from brokenchip) "
            "failed to load: RuntimeError: driver exploded") in res.stderr
    assert "Traceback" not in res.stderr
