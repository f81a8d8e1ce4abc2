"""Errors a user can act on. Every one derives from `ShoalError`, so the CLI prints them as one line
instead of a traceback; this module imports nothing of shoal's, so any layer may raise them."""

from __future__ import annotations


class ShoalError(Exception):
    """A problem with the user's input or setup (a missing file, a bad option, a template that does
    not render); the message says what and how to fix it."""
