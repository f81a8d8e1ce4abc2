"""`shoal conformance` on the CPU, as CI runs it, and proof that the suite can fail.

- the whole suite (every op in every CPU dtype, then tiny Llama/Qwen2/DeepSeek-V3 greedy parity)
  passes through the CLI and writes a Markdown + JSON report that names what it skipped;
- each op check catches a planted wrong override (a realistic bug per op), and the end-to-end
  part catches a wrong op too;
- a known op missing from the table is a visible "not in table" skip, never a pass.
"""

from __future__ import annotations

import json

import pytest
import torch

from shoal.backends import native, registry
from shoal.backends.conformance import run_op_checks
from shoal.backends.conformance.e2e import run_e2e
from shoal.backends.cpu import CpuPlatform
from shoal.cli import main


def test_cli_conformance_on_cpu_passes_and_writes_report(tmp_path, capsys):
    rc = main(["conformance", "--device", "cpu", "--report", str(tmp_path / "cpu.md"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rep = json.loads((tmp_path / "cpu.json").read_text())
    assert rep["passed"] and rep["environment"]["platform"] == "cpu"
    assert rep["dtypes"] == ["float32", "bfloat16", "float16"]
    ran = {(r["op"], r["dtype"]) for r in rep["ops"] if r["status"] == "pass"}
    for op in native.NATIVE_OPS:
        dts = ["float32"] if op == "sample" else rep["dtypes"]
        assert all((op, d) in ran for d in dts), f"{op} not checked in every dtype"
    for r in rep["ops"]:
        if r["op"] not in native.NATIVE_OPS:
            assert r["status"] == "skip" and "not in table" in r["detail"]
    e2e = {(r["model"], r["dtype"]): r for r in rep["e2e"]}
    for model in ("llama", "qwen2"):
        for d in rep["dtypes"]:
            assert e2e[(model, d)]["status"] == "pass", e2e[(model, d)]
    for d in rep["dtypes"]:  # DeepSeek runs when its model file exists, and is never "passed" otherwise
        assert e2e[("deepseek_v3", d)]["status"] in ("pass", "not_run"), e2e[("deepseek_v3", d)]
    md = (tmp_path / "cpu.md").read_text()
    assert md.startswith("# shoal conformance: cpu") and "## End-to-end greedy parity" in md
    assert "PASS on cpu" in out


def _broken(op: str, fn) -> CpuPlatform:
    class Broken(CpuPlatform):
        name = "broken"
        op_overrides = {op: fn}

    return Broken()


N = native.NATIVE_OPS
PLANTED = {
    "rms_norm": lambda x, w, eps: N["rms_norm"](x, torch.ones_like(w), eps),  # forgets the weight
    "rotary": lambda x, cos, sin, inter: N["rotary"](x, cos, sin, not inter),  # wrong pairing
    "store_kv": lambda cache, slots, v: N["store_kv"](cache, (slots + 1) % (cache.shape[0] * cache.shape[1]), v),
    # GQA: query heads read the neighbouring KV head
    "paged_attention": lambda q, k, v, meta, s: N["paged_attention"](q, k.roll(1, 2), v.roll(1, 2), meta, s),
    "mla_attention": lambda ql, qpe, c, meta, s: N["mla_attention"](ql, torch.zeros_like(qpe), c, meta, s),  # no rope
    "moe_experts": lambda x, ids, w, w13, w2: N["moe_experts"](x, ids, torch.full_like(w, 1 / w.shape[1]), w13, w2),
    "linear": lambda x, w, b: N["linear"](x, w, None),  # drops the bias
    "sample": lambda probs, gens: probs.argmax(dim=-1),  # greedy instead of a draw
    # dequantizes through bfloat16 whatever the activation dtype (caught in float32)
    "quant_linear": lambda x, qw, b: torch.nn.functional.linear(x, qw.dequantize(torch.bfloat16).to(x.dtype), b),
    # the halves the other way round: silu of the up projection times the gate
    "quant_linear_silu_mul": lambda x, qw, b: N["silu_and_mul"](
        N["quant_linear"](x, qw, b).roll(qw.out_features // 2, -1)),
}


@pytest.mark.parametrize("op", list(PLANTED))
def test_planted_wrong_op_is_caught(op):
    res = run_op_checks(_broken(op, PLANTED[op]), [torch.float32, torch.bfloat16], seed=1234, ops=[op])
    assert res and all(r.op == op for r in res)
    failed = [r for r in res if r.status == "fail"]
    assert failed, f"the suite did not catch a broken {op}: {[(r.case, r.error) for r in res]}"
    assert all("test_conformance_cpu" in r.impl for r in res)  # the override ran, not native


def test_the_same_ops_pass_when_correct():
    """Control for the planted tests: the native ops pass the same checks with the same seed."""
    res = run_op_checks(CpuPlatform(), [torch.float32, torch.bfloat16], seed=1234, ops=list(PLANTED))
    assert [r for r in res if r.status != "pass"] == []


def test_cli_fails_on_a_platform_with_a_wrong_op(monkeypatch, capsys):
    broken = type(_broken("rms_norm", PLANTED["rms_norm"]))
    real = registry.all_platforms
    monkeypatch.setattr(registry, "all_platforms", lambda: {"broken": broken, **real()})
    rc = main(["conformance", "--device", "broken", "--ops", "rms_norm", "--dtype", "float32", "--skip-e2e", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAIL on broken" in captured.out and "FAILED: rms_norm" in captured.err


def test_end_to_end_parity_catches_a_wrong_op():
    res = run_e2e(_broken("rms_norm", PLANTED["rms_norm"]), ["float32"], seed=3, models=["llama"])
    assert [r.status for r in res] == ["fail"], res


def test_ops_missing_from_the_table_are_skipped_not_passed(monkeypatch):
    monkeypatch.setattr(native, "KNOWN_OPS", native.KNOWN_OPS + ("warp_attention",))
    import shoal.backends.conformance as conf

    monkeypatch.setattr(conf, "KNOWN_OPS", native.KNOWN_OPS)
    res = run_op_checks(CpuPlatform(), [torch.float32], seed=0, ops=["warp_attention"])
    assert [(r.status, r.detail.split(":")[0]) for r in res] == [("skip", "not in table")]


def test_an_op_without_a_check_is_skipped_not_passed(monkeypatch):
    import shoal.backends.conformance as conf

    monkeypatch.delitem(conf.CHECKS, "linear")
    res = run_op_checks(CpuPlatform(), [torch.float32], seed=0, ops=["linear"])
    assert [r.status for r in res] == ["skip"] and "NOT verified" in res[0].detail


def test_every_op_check_passes_on_every_tier(cpu_tier):
    """The op checks (every op, fp32 and bf16) on each ISA tier of shoal's kernels this CPU has (the
    CLI test above runs the best one only): what an AVX2-only or a plain x86-64 CPU would run."""
    res = run_op_checks(CpuPlatform(), [torch.float32, torch.bfloat16], seed=7)
    bad = [(r.op, r.dtype, r.status, r.detail[:200]) for r in res if r.status not in ("pass", "skip")]
    assert not bad, f"{cpu_tier}: {bad}"
    assert sum(r.status == "pass" for r in res) > 100
