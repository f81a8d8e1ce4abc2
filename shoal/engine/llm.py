"""The offline batch API, in the shape vLLM users know:

    from shoal import LLM, SamplingParams
    llm = LLM()                                   # the default model
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from shoal.config import CacheConfig, EngineConfig, SchedulerConfig
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.outputs import RequestOutput
from shoal.sampling_params import SamplingParams

_CACHE_KEYS = {f.name for f in dataclasses.fields(CacheConfig)}
_SCHED_KEYS = {f.name for f in dataclasses.fields(SchedulerConfig)}
_ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)} - {"cache", "scheduler", "parallel"}


def engine_config(model: str | None = None, **options: Any) -> EngineConfig:
    """Flat keyword options (as on the command line) → EngineConfig. Unknown keys are an error."""
    cache = {k: options.pop(k) for k in list(options) if k in _CACHE_KEYS}
    sched = {k: options.pop(k) for k in list(options) if k in _SCHED_KEYS}
    unknown = set(options) - _ENGINE_KEYS
    if unknown:
        raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
    return EngineConfig(model=model, cache=CacheConfig(**cache), scheduler=SchedulerConfig(**sched), **options)


class LLM:
    def __init__(self, model: str | None = None, **options: Any) -> None:
        progress = options.pop("progress", True)
        self.engine = LLMEngine(engine_config(model, **options), progress=progress)

    @property
    def tokenizer(self):  # noqa: ANN201
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("pass one SamplingParams or one per prompt")
        ids = [self.engine.add_request(None, p, sp) for p, sp in zip(prompts, sampling_params)]
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit=" req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [done[i] for i in ids]

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None, **kw: Any
    ) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, **kw) for c in convs]
        return self.generate([{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts],
                             sampling_params)
