"""LLMEngine: the step loop. schedule → execute → append tokens → stop checks → detokenize.

A user request with n > 1 becomes n scheduler `Request`s ("<id>#<i>") that share the prompt (the
prefix cache shares its blocks); the engine reassembles them into one `RequestOutput`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

from shoal.backends import current_platform, resolve_platform, set_platform
from shoal.config import ConfigError, EngineConfig, SchedulerConfig
from shoal.engine.block_manager import BlockManager
from shoal.engine.outputs import CompletionOutput, RequestFailed, RequestMetrics, RequestOutput, TokenLogprob
from shoal.engine.request import Request, RequestStatus
from shoal.engine.scheduler import Scheduler
from shoal.executor.model_runner import ModelRunner
from shoal.loader import IncrementalDetokenizer, Tokenizer, load_config, resolve_model
from shoal.sampling_params import SamplingParams

log = logging.getLogger("shoal")


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the server answers 503."""


class PromptTooLong(ValueError):
    pass


@dataclass
class _Sample:
    """One of the n completions of a user request."""

    req: Request
    index: int
    detok: IncrementalDetokenizer
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    metrics: RequestMetrics
    aborted: bool = False
    error: RequestFailed | None = None
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.source = resolve_model(cfg.model)
        self.model_config = load_config(self.source)
        self.tokenizer = Tokenizer.from_source(self.source)
        platform = resolve_platform(cfg.device) if cfg.device else current_platform()
        set_platform(platform)
        self.platform = platform
        self.max_model_len = min(cfg.scheduler.max_model_len, self.model_config.max_position_embeddings)
        self.runner = ModelRunner(cfg, self.model_config, self.source, platform, self.max_model_len, progress)
        _check_kv_capacity(self.runner, self.max_model_len)
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.runner.block_size, cfg.cache.enable_prefix_caching
        )
        sc = cfg.scheduler
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=sc.max_num_seqs,
                max_num_batched_tokens=max(sc.max_num_batched_tokens, 1),
                max_model_len=self.max_model_len,
                max_waiting=sc.max_waiting,
            ),
            self.block_manager,
        )
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.groups: dict[str, _Group] = {}
        self._by_req: dict[str, tuple[_Group, _Sample]] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens = 0  # counters for metrics
        self.num_generation_tokens = 0
        self.num_computed_prompt_tokens = 0
        self.num_preemptions = 0
        log.info(
            "shoal: %s on %s (%s), %d KV blocks × %d tokens (%.1f MiB, %d bytes/token)",
            self.source.name, platform.name, self.runner.dtype, self.runner.num_blocks, self.runner.block_size,
            self.runner.num_blocks * self.runner.kv_bytes_per_block / 2**20, self.runner.kv_bytes_per_token,
        )

    # ------------------------------------------------------------------ requests
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int] | dict,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> str:
        params = params or SamplingParams()
        request_id = request_id or self.new_request_id()
        if request_id in self.groups:
            raise ValueError(f"duplicate request id {request_id!r}")
        if self.scheduler.num_waiting >= self.cfg.scheduler.max_waiting:
            raise EngineOverloaded(f"waiting queue full ({self.scheduler.num_waiting} requests)")
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:  # tokenized by the caller, perhaps with its text
                ids = list(prompt["prompt_token_ids"])
                text = prompt.get("prompt")
            else:
                text = prompt["prompt"]
                ids = self.tokenizer.encode(text)
        elif isinstance(prompt, str):
            text = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        params.check_vocab(vocab)
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens"
            )
        max_tokens = params.max_tokens or (self.max_model_len - len(ids))
        if len(ids) + max_tokens > self.max_model_len:
            max_tokens = self.max_model_len - len(ids)
        arrival = arrival_time or time.monotonic()
        samples = []
        for i in range(params.n):
            sp = params if params.n == 1 else _child_params(params, i)
            sp = _with_max_tokens(sp, max_tokens)
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(request_id=rid, prompt_token_ids=ids, sampling_params=sp, arrival_time=arrival)
            detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=sp.skip_special_tokens)
            samples.append(_Sample(req=req, index=i, detok=detok, logprobs=[] if sp.logprobs is not None else None))
        group = _Group(request_id, text, ids, params, samples, RequestMetrics(arrival_time=arrival))
        for s in samples:
            self.scheduler.add_request(s.req)
            self._by_req[s.req.request_id] = (group, s)
        self.groups[request_id] = group
        self.num_prompt_tokens += len(ids)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for s in group.samples:
            self.scheduler.finish_request(s.req.request_id, RequestStatus.FINISHED_ABORTED)
            self.runner.release(s.req.request_id)
            self._by_req.pop(s.req.request_id, None)
            if s.finish_reason is None:
                s.finish_reason = "abort"
        group.aborted = True
        return self._output(group)

    def _fail(self, rid: str, err: RequestFailed, changed: dict[str, _Group]) -> None:
        """End the whole user request that scheduler request `rid` belongs to (all n samples) with
        `err`; the rest of the batch is untouched."""
        entry = self._by_req.get(rid)
        if entry is None:
            return
        group = entry[0]
        log.warning("request %s failed: %s", group.request_id, err)
        for s in group.samples:
            if s.finish_reason is None:
                s.finish_reason = "error"
        self.abort_request(group.request_id)
        group.error = err
        changed[group.request_id] = group

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.num_preemptions += len(out.preempted)
        now = time.monotonic()
        changed: dict[str, _Group] = {}
        # requests the scheduler ended itself: they outgrew the whole KV cache
        for r in out.finished:
            g, smp = self._by_req.pop(r.request_id, (None, None))
            if g is None:
                continue
            smp.text += smp.detok.flush()
            smp.finish_reason = smp.finish_reason or "length"
            self.runner.release(r.request_id)
            changed[g.request_id] = g
        if out.is_empty:
            return self._emit(changed, now)
        blocked = {}
        for s in out.scheduled:
            g, smp = self._by_req[s.request.request_id]
            if g.metrics.first_scheduled_time is None:
                g.metrics.first_scheduled_time = now
                g.metrics.num_cached_tokens = s.request.num_cached_tokens
            sp = s.request.sampling_params
            if s.samples and sp.min_tokens and s.request.num_output_tokens < sp.min_tokens:
                blocked[s.request.request_id] = sorted(set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_ids))
        self.num_computed_prompt_tokens += sum(
            max(0, min(s.num_new_tokens, s.request.num_prompt_tokens - s.request.num_computed_tokens))
            for s in out.scheduled
        )
        result = self.runner.execute(out, blocked)
        for rid, err in result.errors.items():
            self._fail(rid, RequestFailed(err.message, client_error=err.client_error), changed)
        self.scheduler.update_after_step(out, result.sampled)
        now = time.monotonic()
        for rid, tok in result.sampled.items():
            entry = self._by_req.get(rid)
            if entry is None:  # failed with an earlier sample of its group
                continue
            try:
                self._take_token(rid, tok, result.logprobs.get(rid), now, changed)
            except Exception as exc:  # noqa: BLE001 - this request ends; the batch goes on
                self._fail(rid, RequestFailed(f"processing its output failed: {type(exc).__name__}: {exc}"),
                           changed)
        return self._emit(changed, now)

    def _take_token(self, rid: str, tok: int, logprobs: tuple[float, list[tuple[int, float]]] | None, now: float,
                    changed: dict[str, _Group]) -> None:
        """A sampled token → logprobs, stop checks, text; finishes the sample when it stops."""
        g, smp = self._by_req[rid]
        self.num_generation_tokens += 1
        if g.metrics.first_token_time is None:
            g.metrics.first_token_time = now
        g.metrics.last_token_time = now
        if logprobs is not None and smp.logprobs is not None:
            lp, top = logprobs
            smp.cumulative_logprob += lp
            smp.logprobs.append(
                TokenLogprob(tok, self._tok_text(tok), lp, [(i, self._tok_text(i), v) for i, v in top])
            )
        self._check_stop(smp, tok)
        changed[g.request_id] = g
        if smp.finish_reason is not None:
            status = RequestStatus.FINISHED_LENGTH if smp.finish_reason == "length" else RequestStatus.FINISHED_STOPPED
            self.scheduler.finish_request(rid, status)
            self.runner.release(rid)
            self._by_req.pop(rid, None)

    def _emit(self, changed: dict[str, _Group], now: float) -> list[RequestOutput]:
        outputs = []
        for g in changed.values():
            if g.finished:
                g.metrics.finished_time = now
                self.groups.pop(g.request_id, None)
            outputs.append(self._output(g))
        return outputs

    def _tok_text(self, tok: int) -> str:
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def _check_stop(self, smp: _Sample, tok: int) -> None:
        req, sp = smp.req, smp.req.sampling_params
        n_out = req.num_output_tokens
        min_ok = n_out >= sp.min_tokens
        if min_ok and tok in sp.stop_token_ids:
            smp.finish_reason, smp.stop_reason = "stop", tok
            if not sp.include_stop_str_in_output:
                return
        if min_ok and not sp.ignore_eos and tok in self.eos_ids:
            smp.finish_reason, smp.stop_reason = "stop", None
            return
        delta = smp.detok.add(tok)
        prev_len = len(smp.text)
        smp.text += delta
        if smp.finish_reason is None and min_ok and sp.stop and delta:
            # search only where a new match can start
            window_start = max(0, prev_len - max(len(s) for s in sp.stop) + 1)
            best = None
            for stop in sp.stop:
                i = smp.text.find(stop, window_start)
                if i != -1 and (best is None or i < best[0]):
                    best = (i, stop)
            if best is not None:
                i, stop = best
                smp.text = smp.text[: i + len(stop)] if sp.include_stop_str_in_output else smp.text[:i]
                smp.finish_reason, smp.stop_reason = "stop", stop
                return
        if smp.finish_reason is None and (
            n_out >= (sp.max_tokens or 0) or req.num_tokens >= self.max_model_len
        ):
            smp.text += smp.detok.flush()
            smp.finish_reason = "length"

    def _visible_text(self, smp: _Sample) -> str:
        """While running, hold back a tail that could still become a stop string."""
        stops = smp.req.sampling_params.stop
        if smp.finish_reason is not None or not stops:
            return smp.text
        hold = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(smp.text)), 0, -1):
                if smp.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return smp.text[: len(smp.text) - hold] if hold else smp.text

    def _output(self, g: _Group) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index,
                text=self._visible_text(s),
                token_ids=list(s.req.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for s in g.samples
        ]
        return RequestOutput(g.request_id, g.prompt, g.prompt_ids, outs, g.finished or g.aborted, g.metrics, g.error)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generation_tokens,
            "computed_prompt_tokens": self.num_computed_prompt_tokens,
            "num_preemptions": self.num_preemptions,
        }


def _check_kv_capacity(runner: ModelRunner, max_model_len: int) -> None:
    """A cache that cannot hold one full-length sequence would end replies early, silently."""
    capacity = runner.num_blocks * runner.block_size
    if capacity >= max_model_len:
        return
    need = math.ceil(max_model_len / runner.block_size) * runner.kv_bytes_per_block
    raise ConfigError(
        f"the KV cache holds {capacity} tokens ({runner.num_blocks} blocks of {runner.block_size}, "
        f"{runner.num_blocks * runner.kv_bytes_per_block / 2**20:.1f} MiB), fewer than one sequence of "
        f"--max-model-len {max_model_len} tokens: give it at least {need / 2**20:.1f} MiB (--kv-cache-memory) "
        f"or lower --max-model-len to {capacity}")


def _child_params(p: SamplingParams, i: int) -> SamplingParams:
    return dataclasses.replace(p, n=1, seed=p.child_seed(i))


def _with_max_tokens(p: SamplingParams, max_tokens: int) -> SamplingParams:
    if p.max_tokens == max_tokens:
        return p
    return dataclasses.replace(p, max_tokens=max_tokens, min_tokens=min(p.min_tokens, max_tokens))
