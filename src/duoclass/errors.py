"""User-facing errors.

A `DuoclassError` carries one line that names the file, row or value at fault and
says how to fix it. The CLI prints it as `error: ...` and exits with status 2,
never with a traceback. Library users can catch it like any exception.
"""
from __future__ import annotations


class DuoclassError(Exception):
    """A problem with the user's input, settings or files, explained in one line."""


class NotFittedError(DuoclassError):
    """Raised when a classifier is used before it has weights."""
