"""shoal: an inference engine and OpenAI-compatible server for DeepSeek-family models, on any chip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from shoal.engine.llm import LLM
    from shoal.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import shoal` stays light (the planner needs no torch)
    if name == "LLM":
        from shoal.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from shoal.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
