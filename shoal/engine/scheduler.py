"""Scheduler: which requests compute how many tokens this step. Pure Python, no torch.

vLLM v1's rule: there is no prefill or decode phase — every request catches up its computed tokens
(`num_tokens - num_computed_tokens`) within one token budget per step. A decode wants 1 token, a
fresh prompt wants all of it and gets what is left of the budget (chunked prefill).

One step, `schedule()`:
  1. Running requests in admission order. When the cache runs out of blocks, the newest running
     request is preempted (blocks freed, back to the front of the waiting queue, recomputed later
     from its prompt + outputs) until the allocation fits. A request that cannot fit even when it is
     the only one running has filled the whole cache: it finishes with FINISHED_LENGTH.
  2. Only if nobody was preempted: admit waiting requests first come first served (no skipping),
     each starting from its longest cached prefix, while budget and `max_num_seqs` allow.

The engine runs the model on `SchedulerOutput.scheduled`, then calls `update_after_step` with the
sampled tokens, checks stops and calls `finish_request`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shoal.config import SchedulerConfig
from shoal.engine.block_manager import BlockManager
from shoal.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens to compute this step, from request.num_computed_tokens onward
    _samples: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        r = self.request
        self._samples = r.num_computed_tokens + self.num_new_tokens == r.num_tokens

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the request's tokens, so a new token is sampled after it.

        Fixed when the step is scheduled; stays right after `update_after_step` moves the request on.
        """
        return self._samples


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # batch order: running requests first, then newly admitted
    preempted: list[Request]
    num_batched_tokens: int
    # requests the scheduler ended itself (FINISHED_LENGTH: they outgrew the whole KV cache); the
    # engine reports them like any finished request. May be non-empty when `is_empty`.
    finished: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Nothing to run this step."""
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, by id

    # ------------------------------------------------------------------ queue
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if not req.prompt_token_ids:
            raise ValueError(f"request {req.request_id!r} has an empty prompt")
        bm = self.block_manager
        need = bm.blocks_needed(req.num_prompt_tokens)
        if need > bm.num_blocks:
            raise ValueError(
                f"request {req.request_id!r}: prompt of {req.num_prompt_tokens} tokens needs {need} KV blocks "
                f"of {bm.block_size} tokens, but the cache has only {bm.num_blocks} blocks "
                f"({bm.num_blocks * bm.block_size} tokens); give the KV cache more memory or shorten the prompt"
            )
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        self.requests[req.request_id] = req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [], 0)
        self._schedule_running(out)
        if not out.preempted:  # a cache that just had to evict running work takes no newcomers
            self._admit_waiting(out)
        return out

    def _budget(self, out: SchedulerOutput) -> int:
        return self.config.max_num_batched_tokens - out.num_batched_tokens

    def _take(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.scheduled.append(ScheduledRequest(req, num_new))
        out.num_batched_tokens += num_new

    def _schedule_running(self, out: SchedulerOutput) -> None:
        i = 0
        while i < len(self.running) and self._budget(out) > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, self._budget(out))
            if num_new <= 0:  # nothing to compute (its sampled token has not arrived); skip it
                i += 1
                continue
            while not self.block_manager.allocate_slots(req, num_new):
                if len(self.running) == 1:  # alone and still too big: it has filled the whole cache
                    self.running.pop()
                    self._finish(req, RequestStatus.FINISHED_LENGTH)
                    out.finished.append(req)
                    break
                victim = self.running.pop()  # the newest running request, maybe req itself
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self._take(out, req, num_new)
                i += 1

    def _admit_waiting(self, out: SchedulerOutput) -> None:
        while self.waiting and self._budget(out) > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            computed, num_cached = self.block_manager.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_cached, self._budget(out))
            if not self.block_manager.allocate_slots(req, num_new, computed):
                if self.running:
                    return  # first come first served: wait for blocks to come back
                # even an empty cache cannot hold this request's tokens (prompt + outputs kept over
                # a preemption): it can never sample again
                self.waiting.popleft()
                self._finish(req, RequestStatus.FINISHED_LENGTH)
                out.finished.append(req)
                continue
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._take(out, req, num_new)

    def _preempt(self, req: Request) -> None:
        """Free a request just taken out of running; it recomputes prompt + outputs when readmitted."""
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ after the model ran
    def update_after_step(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Advance computed tokens, offer newly full blocks to the prefix cache, append samples."""
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(req)
            tok = sampled.get(req.request_id)
            if tok is not None:
                req.append_output_token(tok)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Stop, length or abort: drop the request from the queues and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, status)
        return req

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Free a request already taken out of running/waiting."""
        self.block_manager.free(req)
        req.status = status
        del self.requests[req.request_id]
