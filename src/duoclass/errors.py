"""User-facing errors.

A `DuoclassError` carries one line that names the file, row or value at fault and
says how to fix it. The CLI prints it as `error: ...` and exits with status 2,
never with a traceback. Library users can catch it like any exception.
"""
from __future__ import annotations


class DuoclassError(Exception):
    """A problem with the user's input, settings or files, explained in one line."""


class NotFittedError(DuoclassError, ValueError, AttributeError):
    """Raised when a classifier is used before it has weights. Like scikit-learn's, it is also a ValueError
    and an AttributeError, so code written for scikit-learn catches it."""


def one_line(e: Exception) -> str:
    """The message on one line, however many lines a wrapped library error brought into it."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())
