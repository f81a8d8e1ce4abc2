"""Errors a user can act on. The CLI prints them as one line instead of a traceback."""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    from shoal.config import ConfigError

    types: list[type[BaseException]] = [ConfigError]
    try:
        from shoal.loader import CheckpointError, ModelNotFound

        types += [ModelNotFound, CheckpointError]
    except ImportError:
        pass
    try:
        from shoal.loader.chat_template import ChatTemplateError

        types.append(ChatTemplateError)
    except ImportError:
        pass
    try:
        from shoal.models.weights import WeightLoadError

        types.append(WeightLoadError)
    except ImportError:
        pass
    return tuple(types)
