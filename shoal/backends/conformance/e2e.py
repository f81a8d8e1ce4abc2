"""End-to-end greedy parity: tiny random checkpoints generated through shoal on the device (in
each tested dtype) vs on the CPU in float32.

Greedy decoding amplifies any difference, and float rounding may legitimately flip a near-tie,
so each prompt is compared up to the reference's first step whose top-2 logprob margin is below
the dtype's threshold. A run passes when no token differs before that point and at least half of
the generated tokens were compared; otherwise it is a fail (a divergence) or a fail marked
"inconclusive" (too few discriminative tokens to say anything).
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


def compare(ref: list[tuple[list[int], list[float]]], got: list[tuple[list[int], list[float]]],
            near_tie: float) -> tuple[int, int, int, str]:
    """(matched, compared, generated, first divergence or "") over all prompts."""
    matched = compared = generated = 0
    first = ""
    for k, ((rt, rm), (gt, _)) in enumerate(zip(ref, got)):
        generated += len(rt)
        upto = next((i for i, m in enumerate(rm) if m < near_tie), len(rt))
        compared += upto
        div = next((i for i in range(upto) if i >= len(gt) or gt[i] != rt[i]), None)
        matched += upto if div is None else div
        if div is not None and not first:
            first = f"prompt {k} (length {PROMPT_LENS[k]}) diverged at token {div}: {gt[:upto]} vs {rt[:upto]}"
    return matched, compared, generated, first


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
        ref = _generate(cpu, path, "float32", prompts)
    except Exception as exc:  # noqa: BLE001
        return [E2EResult(name, d, "error", detail=f"the CPU float32 reference run failed, so nothing on the "
                          f"device could be compared: {type(exc).__name__}: {exc}"[:400]) for d in dtypes]
    results = []
    for d in dtypes:
        try:
            got = _generate(platform, path, d, prompts)
        except Exception as exc:  # noqa: BLE001
            results.append(E2EResult(name, d, "error", detail=f"{type(exc).__name__}: {exc}"[:400]))
            continue
        matched, compared, generated, first = compare(ref, got, NEAR_TIE[d])
        if first:
            results.append(E2EResult(name, d, "fail", matched, compared, generated, first))
        elif compared * 2 < generated:
            results.append(E2EResult(name, d, "fail", matched, compared, generated,
                                     "inconclusive: the reference has near-ties too early to compare enough tokens"))
        else:
            results.append(E2EResult(name, d, "pass", matched, compared, generated))
    return results
