"""How much one heavy or hostile request stalls everyone else on a running `shoal serve`.

A stream of 400 tokens runs in the background and `/health` is polled every 20 ms; each heavy request
is sent in turn, and while it is in flight the script records the longest `/health` round trip and
the longest gap between two events of the stream. A quiet window (no heavy request) is the baseline.

    python benchmarks/server_stall.py                  # the default model
    python benchmarks/server_stall.py --repo /tmp/old  # the same against another checkout (before/after)

Writes benchmarks/results/<date>_server_stall.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from shoal.backends.cpu import isa

ROOT = Path(__file__).resolve().parent.parent
BOMB = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"


def heavy_requests() -> list[tuple[str, str, dict]]:
    msgs = [{"role": "user", "content": "x"}]
    return [
        ("8 MB prompt (under the body limit)", "/v1/completions", {"prompt": "word " * 1_600_000, "max_tokens": 1}),
        ("100k prompts in one 0.5 MB body", "/v1/completions", {"prompt": ["a"] * 100_000, "max_tokens": 1}),
        ("n=128, top_logprobs=20, no max_tokens", "/v1/chat/completions",
         {"messages": msgs, "n": 128, "logprobs": True, "top_logprobs": 20}),
        ("request chat template: nested loops", "/v1/chat/completions",
         {"messages": msgs, "max_tokens": 2, "chat_template": BOMB}),
        ("request chat template: 1 GB string", "/v1/chat/completions",
         {"messages": msgs, "max_tokens": 2, "chat_template": "{{ 'x' * 10**9 }}"}),
        ("seed 2^64 (poison)", "/v1/chat/completions",
         {"messages": msgs, "seed": 2**64, "temperature": 1, "max_tokens": 4}),
    ]


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):  # the server is gone
        return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Probe:
    """Polls /health and follows one long stream, keeping (time, latency) and event times."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.health: list[tuple[float, float]] = []
        self.events: list[float] = []
        self.stop = threading.Event()

    def poll(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    c.get(f"{self.url}/health")
                except httpx.HTTPError:
                    pass
                self.health.append((t0, time.monotonic() - t0))
                time.sleep(0.02)

    def stream(self) -> None:
        body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 400,
                "temperature": 0, "ignore_eos": True, "stream": True}
        while not self.stop.is_set():
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(time.monotonic())

    def window(self, t0: float, t1: float) -> tuple[float, float]:
        """Longest /health round trip started in [t0, t1], longest gap between stream events in it."""
        h = max((lat for t, lat in self.health if t0 <= t <= t1), default=float("nan"))
        ev = [t for t in self.events if t0 <= t <= t1]
        gaps = [b - a for a, b in zip(ev, ev[1:])]
        return h, max(gaps, default=float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose server to run (default: this one)")
    ap.add_argument("--label", default=None, help="name for this run in the results (default: the git commit)")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    label = args.label or commit
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": args.repo, "TOKENIZERS_PARALLELISM": "false"}
    log_path = Path(tempfile.gettempdir()) / f"shoal_server_stall_{label}.log"
    print(f"server log: {log_path}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([args.python, "-m", "shoal.server", "--port", str(port), "--allow-request-chat-template",
                                 "--max-model-len", "2048"], cwd=args.repo, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        probe = Probe(url)
        threads = [threading.Thread(target=probe.poll, daemon=True), threading.Thread(target=probe.stream, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(5)  # the stream is under way
        rows = []
        t0 = time.monotonic()
        time.sleep(3)
        rows.append(("quiet (no heavy request)", "-", 3.0, *probe.window(t0, time.monotonic()), rss_mib(proc.pid)))
        for name, path, body in heavy_requests():
            t0 = time.monotonic()
            try:
                r = httpx.post(f"{url}{path}", json=body, timeout=60)  # a client gives up after a minute
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            t1 = time.monotonic()
            time.sleep(0.2)
            if proc.poll() is not None:
                status += f"; the server died (exit {proc.returncode}: {'killed' if proc.returncode < 0 else 'error'})"
            rows.append((name, status, t1 - t0, *probe.window(t0, t1 + 0.2), rss_mib(proc.pid)))
            print(rows[-1], flush=True)
            if proc.poll() is not None:
                break
        probe.stop.set()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    stamp = datetime.now(timezone.utc)
    cpu = isa.cpuinfo_field("model name") or platform.processor()
    head = (f"# Server stall under heavy requests — {stamp:%Y-%m-%d %H:%M} UTC\n\n"
            f"Server: `{label}`, default model, `--max-model-len 2048`, on {cpu} ({os.cpu_count()} cores). "
            "A 400-token stream runs throughout; `/health` is polled every 20 ms.\n\n"
            "| request | status | its time (s) | longest /health (ms) | longest stream gap (ms) | server RSS after (MiB) |\n"
            "|---|---|---:|---:|---:|---:|\n")
    lines = [f"| {n} | {s} | {d:.2f} | {h * 1e3:.0f} | {g * 1e3:.0f} | {m:.0f} |" for n, s, d, h, g, m in rows]
    out = ROOT / "benchmarks" / "results" / f"{stamp:%Y-%m-%d_%H%M}_server_stall_{label}"
    out.with_suffix(".md").write_text(head + "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"label": label, "cpu": cpu, "date": stamp.isoformat(), "rows": [
        dict(zip(("request", "status", "seconds", "health_max_s", "stream_gap_max_s", "rss_mib"), r)) for r in rows]},
        indent=1))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
