"""End-to-end greedy parity: tiny random checkpoints generated through shoal on the device (in
each tested dtype) vs on the CPU in float32.

Two comparisons per model and dtype, both against the CPU float32 reference run:
- greedy: the free-running greedy tokens of each prompt, up to the reference's first near-tie
  (a step whose top-2 logprob margin is below the dtype's threshold; rounding may flip it);
- teacher-forced: after every prefix of the reference continuation, the device's next token,
  checked at every step whose reference margin is at least the threshold. This keeps checking
  past the first near-tie, where free-running greedy would compare different texts.
A run passes when at least a quarter of the reference steps were discriminative and enough of
them agree (every one in float32, MIN_AGREEMENT in half precision); otherwise it fails, naming the
first difference, or fails as "inconclusive".
"""

from __future__ import annotations

import importlib.util
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

from shoal.backends import registry
from shoal.backends.base import Platform
from shoal.backends.conformance.report import E2EResult

PROMPT_LENS = (1, 6, 19, 40)
Step = tuple[int, float, float]  # (token, logprob, top-2 logprob margin) of one generated token
Run = list[Step]
MAX_TOKENS = 16
# a reference step whose top-2 logprob margin is below this may flip under the dtype's rounding
NEAR_TIE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}
# MoE routing is discontinuous: a rounding-level change can swap an expert, so margins need more room
MOE_MODELS = {"deepseek_v3"}
MOE_FACTOR = 2.5
# share of discriminative teacher-forced steps that must agree: all in float32; in half precision a
# rare flip is rounding (a routing swap, a margin just above the threshold), a wrong op flips most
MIN_AGREEMENT = {"float32": 1.0, "float16": 0.95, "bfloat16": 0.9}


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def _generate(platform: Platform, path: Path, dtype: str, prompts: list[list[int]],
              forced: list[list[int]] | None = None) -> tuple[list[Run], list[list[Step]]]:
    """With `platform` active: the greedy run of each prompt, and (when `forced` holds each
    prompt's reference continuation) the next-token step after every prefix of it."""
    from shoal import LLM, SamplingParams

    registry.set_platform(platform)
    llm = LLM(model=str(path), dtype=dtype, progress=False, max_model_len=256, kv_cache_memory=16 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    runs = [_steps(o) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    steps: list[list[Step]] = []
    if forced is not None:
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2)
        reqs = [{"prompt_token_ids": p + cont[:i]} for p, cont in zip(prompts, forced) for i in range(len(cont))]
        flat = [_steps(o)[0] for o in llm.generate(reqs, one)]
        for cont in forced:
            steps.append(flat[: len(cont)])
            flat = flat[len(cont):]
    return runs, steps


def _steps(out: Any) -> list[Step]:
    """(token, its logprob, top-2 margin) per generated token."""
    c = out.outputs[0]
    res = []
    for tok, lp in zip(c.token_ids, c.logprobs or []):
        margin = lp.top[0][2] - lp.top[1][2] if len(lp.top) > 1 else float("inf")
        res.append((tok, lp.logprob, margin))
    return res


def compare_greedy(ref: list[Run], got: list[Run], near_tie: float) -> tuple[int, int, str]:
    """Free-running greedy tokens, each prompt up to the reference's first near-tie:
    (tokens matched before any divergence, tokens compared, first divergence or "")."""
    matched = compared = 0
    first = ""
    for k, (r, g) in enumerate(zip(ref, got)):
        upto = next((i for i, (_, _, m) in enumerate(r) if m < near_tie), len(r))
        compared += upto
        div = next((i for i in range(upto) if i >= len(g) or g[i][0] != r[i][0]), None)
        matched += upto if div is None else div
        if div is not None and not first:
            first = (f"greedy: prompt {k} (length {PROMPT_LENS[k]}) diverged at token {div}: "
                     f"{[t for t, _, _ in g[:upto]]} vs reference {[t for t, _, _ in r[:upto]]}")
    return matched, compared, first


def compare_forced(ref: list[Run], steps: list[list[Step]], near_tie: float) -> tuple[int, int, float, str]:
    """Teacher-forced: after every prefix of the reference continuation, the device's next token
    must be the reference's wherever the reference margin is at least `near_tie`.
    (steps that agree, steps checked, max logprob difference on agreeing steps, first miss or "")."""
    agree = checked = 0
    max_lp = 0.0
    first = ""
    for k, (r, st) in enumerate(zip(ref, steps)):
        for i, ((rt, rl, rm), (gt, gl, _)) in enumerate(zip(r, st)):
            if gt == rt:
                max_lp = max(max_lp, abs(gl - rl))
            if rm < near_tie:
                continue
            checked += 1
            if gt == rt:
                agree += 1
            elif not first:
                first = (f"teacher-forced: prompt {k} step {i}: device chose {gt}, reference {rt} "
                         f"(reference margin {rm:.3f} ≥ {near_tie})")
    return agree, checked, max_lp, first


def run_e2e(platform: Platform, dtypes: list[str], seed: int, models: list[str] | None = None,
            log: Callable[[str], None] | None = None) -> list[E2EResult]:
    from shoal.backends.conformance.tiny_models import TINY_MODELS
    from shoal.backends.cpu import CpuPlatform

    say = log or (lambda _line: None)
    names = models or list(TINY_MODELS)
    results: list[E2EResult] = []
    previous = registry._ACTIVE
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-conformance-") as tmp:
            for name in names:
                out = _run_model(name, Path(tmp) / name, platform, dtypes, seed, CpuPlatform(), TINY_MODELS)
                for r in out:
                    say(f"  {r.status:7} {r.model:12} {r.dtype:9} "
                        + (f"{r.matched}/{r.compared} tokens match ({r.generated} generated)"
                           if r.status in ("pass", "fail") else "") + (f"  {r.detail}" if r.detail else ""))
                results += out
    finally:
        registry._ACTIVE = previous
    return results


def _run_model(name: str, path: Path, platform: Platform, dtypes: list[str], seed: int, cpu: Platform,
               table: dict[str, Any]) -> list[E2EResult]:
    from shoal.backends.conformance.tiny_models import make_tiny

    module = table[name][0]
    if importlib.util.find_spec("transformers") is None:
        return [E2EResult(name, d, "not_run", detail="transformers is not installed (needed to make the "
                          "tiny checkpoint: pip install transformers)") for d in dtypes]
    if importlib.util.find_spec(module) is None:
        return [E2EResult(name, d, "not_run", detail=f"model unavailable: {module} does not exist yet")
                for d in dtypes]
    try:
        make_tiny(name, path, seed)
    except Exception as exc:  # noqa: BLE001
        return [E2EResult(name, d, "not_run", detail=f"could not build the tiny checkpoint with transformers: "
                          f"{type(exc).__name__}: {exc}"[:300]) for d in dtypes]
    prompts = _prompts(256, seed)
    try:
        ref, _ = _generate(cpu, path, "float32", prompts)
    except Exception as exc:  # noqa: BLE001
        return [E2EResult(name, d, "error", detail=f"the CPU float32 reference run failed, so nothing on the "
                          f"device could be compared: {type(exc).__name__}: {exc}"[:400]) for d in dtypes]
    results = []
    for d in dtypes:
        near_tie = NEAR_TIE[d] * (MOE_FACTOR if name in MOE_MODELS else 1)
        try:
            got, steps = _generate(platform, path, d, prompts, [[t for t, _, _ in r] for r in ref])
        except Exception as exc:  # noqa: BLE001
            results.append(E2EResult(name, d, "error", detail=f"{type(exc).__name__}: {exc}"[:400]))
            continue
        matched, compared, first_g = compare_greedy(ref, got, near_tie)
        agree, checked, max_lp, first_f = compare_forced(ref, steps, near_tie)
        generated = sum(len(r) for r in ref)
        need = MIN_AGREEMENT[d]
        detail = (f"teacher-forced {agree}/{checked} steps agree (reference margin ≥ {near_tie:g}; "
                  f"needed {need:.0%}), max logprob diff {max_lp:.3f}")
        misses = "; ".join(x for x in (first_g, first_f) if x)
        if checked * 4 < generated:
            status = "fail"
            detail = f"inconclusive: only {checked} of {generated} reference steps have margin ≥ {near_tie:g}"
        elif agree < need * checked or (need == 1.0 and first_g):
            status, detail = "fail", f"{detail}; first difference: {misses}"
        else:
            status = "pass"
            if misses:
                detail += f"; tolerated: {misses}"
        results.append(E2EResult(name, d, status, matched, compared, generated, detail))
    return results
