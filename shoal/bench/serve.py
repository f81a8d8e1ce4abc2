"""`shoal bench serve`: a load generator for any OpenAI-compatible server (shoal, llama.cpp, vLLM).

Each request streams (`stream: true`, `stream_options.include_usage`) so the client sees every token
arrive. Per request it records TTFT (send → first text), the gaps between text chunks (ITL), the
end-to-end latency and the output length (from `usage` when the server sends it, else the number of
text chunks); TPOT is (E2E − TTFT) / (output tokens − 1). Requests are sent either by a closed loop
of `--concurrency` clients or by a Poisson process at `--request-rate` per second (optionally also
capped by `--concurrency`). Prompts are `random` words (a fixed word list whose words are one token
in common BPE vocabularies) or lines of a JSONL file with a "prompt" (and optional "output_len").

    shoal bench serve --base-url http://127.0.0.1:8000 --concurrency 8 --num-prompts 32 \
        --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# short, common words: one token each in GPT-2/Llama/Qwen/DeepSeek vocabularies (with the leading space)
_WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be has or had "
    "not first one their its new after but who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made well first part three these being under "
    "year between while team both through de high season several people said place called area since "
    "year long music south north because good work game same each life day house best end home family"
).split()


@dataclass
class BenchRequest:
    prompt: str
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


# ---------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (in the input's unit)."""
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def tpot(r: RequestResult) -> float | None:
    """Time per output token after the first; None for single-token outputs."""
    if r.output_tokens < 2:
        return None
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def aggregate(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    ms = 1000.0
    tpots = [t for t in map(tpot, ok) if t is not None]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput_rps": len(ok) / duration if duration > 0 else math.nan,
        "output_throughput_tok_s": out_tokens / duration if duration > 0 else math.nan,
        "total_token_throughput_tok_s": (in_tokens + out_tokens) / duration if duration > 0 else math.nan,
        "ttft_ms": {k: v * ms for k, v in summarize([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * ms for k, v in summarize(tpots).items()},
        "itl_ms": {k: v * ms for k, v in summarize([g for r in ok for g in r.itl]).items()},
        "e2e_latency_ms": {k: v * ms for k, v in summarize([r.latency for r in ok]).items()},
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"{'completed / failed':<34}{res['completed']} / {res['failed']}",
        f"{'duration (s)':<34}{res['duration_s']:.2f}",
        f"{'input / output tokens':<34}{res['total_input_tokens']} / {res['total_output_tokens']}",
        f"{'request throughput (req/s)':<34}{res['request_throughput_rps']:.3f}",
        f"{'output throughput (tok/s)':<34}{res['output_throughput_tok_s']:.2f}",
        f"{'total token throughput (tok/s)':<34}{res['total_token_throughput_tok_s']:.2f}",
        "",
        f"{'(ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_latency_ms", "E2E")]:
        s = res[key]
        lines.append(f"{label:<14}" + "".join(_cell(s[q]) for q in ("mean", "p50", "p90", "p99")))
    if res["errors"]:
        lines += ["", "errors:", *(f"  {e}" for e in res["errors"])]
    return "\n".join(lines)


def _cell(v: float | None) -> str:
    return f"{'-':>10}" if v is None or not math.isfinite(v) else f"{v:>10.1f}"


# ---------------------------------------------------------------------------- datasets
def random_dataset(num: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [
        BenchRequest(" ".join(rng.choice(_WORDS) for _ in range(max(1, input_len))), output_len) for _ in range(num)
    ]


def file_dataset(path: str, num: int, output_len: int, seed: int) -> list[BenchRequest]:
    items: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                prompt = d["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"prompt\" string") from None
            items.append(BenchRequest(str(prompt), int(d.get("output_len") or output_len)))
    if not items:
        raise ValueError(f"{path} holds no prompts")
    rng = random.Random(seed)
    rng.shuffle(items)
    return [items[i % len(items)] for i in range(num)]


# ---------------------------------------------------------------------------- the client
def _payload(args: argparse.Namespace, model: str, req: BenchRequest) -> tuple[str, dict[str, Any]]:
    common: dict[str, Any] = {
        "model": model, "max_tokens": req.output_len, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": args.temperature,
    }
    if args.ignore_eos:
        common["ignore_eos"] = True  # shoal, vLLM and llama.cpp honour it; others ignore it
    if args.endpoint == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": req.prompt}]}
    return "/v1/completions", {**common, "prompt": req.prompt}


def _text_of(chunk: dict[str, Any]) -> str:
    text = ""
    for c in chunk.get("choices") or []:
        if "text" in c:
            text += c.get("text") or ""
        delta = c.get("delta") or {}
        text += (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return text


async def send_one(client: Any, url: str, payload: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    res = RequestResult(ok=False, start=time.perf_counter())
    chunks = 0
    last = res.start
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")[:200]
                res.error = f"HTTP {resp.status_code}: {body}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    res.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                if _text_of(chunk):
                    t = time.perf_counter()
                    if chunks == 0:
                        res.ttft = t - res.start
                    else:
                        res.itl.append(t - last)
                    last = t
                    chunks += 1
        res.latency = time.perf_counter() - res.start
        if chunks == 0:
            res.error = "no text in the stream"
            return res
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def _discover_model(client: Any, base: str, headers: dict[str, str]) -> str:
    r = await client.get(f"{base}/v1/models", headers=headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_bench(args: argparse.Namespace, dataset: list[BenchRequest]) -> dict[str, Any]:
    import httpx

    base = args.base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.concurrency or len(dataset)
    limits = httpx.Limits(max_connections=limit + 1, max_keepalive_connections=limit + 1)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = args.model or await _discover_model(client, base, headers)
        for _ in range(args.warmup):
            path, payload = _payload(args, model, BenchRequest(dataset[0].prompt, min(dataset[0].output_len, 8)))
            warm = await send_one(client, base + path, payload, headers)
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(dataset), desc="bench", unit="req", file=sys.stderr)
        sem = asyncio.Semaphore(limit)
        rng = random.Random(args.seed)

        async def one(req: BenchRequest) -> RequestResult:
            async with sem:
                path, payload = _payload(args, model, req)
                r = await send_one(client, base + path, payload, headers)
            if bar:
                bar.update(1)
            return r

        t0 = time.perf_counter()
        tasks = []
        for i, req in enumerate(dataset):
            if i and math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
            tasks.append(asyncio.ensure_future(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if bar:
            bar.close()
    out = aggregate(list(results), duration)
    out["config"] = {
        "base_url": base, "model": model, "endpoint": args.endpoint, "num_prompts": len(dataset),
        "concurrency": args.concurrency, "request_rate": args.request_rate, "dataset": args.dataset,
        "input_len": args.input_len, "output_len": args.output_len,
    }
    return out


def _jsonable(x: Any) -> Any:
    """NaN (no samples) → null, so the output is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (with or without /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: the first from /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=None, help="clients in flight at most (default: no cap)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default: inf, all at once up to --concurrency)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--dataset", default="random", help="'random' or a JSONL file of {\"prompt\": ...}")
    p.add_argument("--input-len", type=int, default=128, help="random dataset: words per prompt (≈ tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: ask for exactly --output-len tokens)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    if not args.request_rate > 0:
        raise SystemExit("--request-rate must be positive")
    if args.dataset == "random":
        dataset = random_dataset(args.num_prompts, args.input_len, args.output_len, args.seed)
    else:
        dataset = file_dataset(args.dataset, args.num_prompts, args.output_len, args.seed)
    res = _jsonable(asyncio.run(run_bench(args, dataset)))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0 if res["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.bench.serve", description=__doc__.split("\n")[0])
    add_args(p)
    return cmd_bench_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
