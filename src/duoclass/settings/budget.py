"""The attack budget: `--eps` values such as `8/255` or `0.03`, parsed without torch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import field
from typing import Any


from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


DEFAULT_EPS = "8/255"  # the --eps default; for text it means TEXT_EPS
TEXT_EPS = 1.0  # the --eps default for text: L2 norm of the perturbation of the embedding table


# --- epsilon -----------------------------------------------------------------------------------
def _budget(value: str | float, flag: str) -> float:
    """A finite number >= 0 from 0.03, "0.03" or a fraction "8/255"."""
    v = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    elif isinstance(value, str):
        num, slash, den = value.partition("/")
        try:
            v = float(num) / float(den) if slash else float(value)
        except (ValueError, ZeroDivisionError):
            pass
    if not math.isfinite(v):
        raise DuoclassError(f"{flag}: got {value!r}; expected a number or a fraction, e.g. {flag} 8/255 or {flag} 0.03")
    if v < 0:
        raise DuoclassError(f"{flag}: got {value!r}; the attack budget must be >= 0, e.g. {flag} 8/255")
    return v


def parse_eps(text: str | float, flag: str = "--eps") -> float:
    """An image attack budget from "8/255", "0.03" or 0.03; a DuoclassError naming `flag` unless it is in [0, 1]."""
    v = _budget(text, flag)
    if v > 1:
        raise DuoclassError(f"{flag}: got {text!r}; images are attacked in [0, 1] pixel space, so eps must be in "
                            f"[0, 1], e.g. {flag} 8/255")
    return v


def eps_value(text: str | float, task: str) -> float:
    """--eps for `task`: in [0, 1] for images; for text any number >= 0, and the untouched default means TEXT_EPS."""
    if task == "text":
        return TEXT_EPS if text == DEFAULT_EPS else _budget(text, "--eps")
    if task == "image":
        return parse_eps(text)
    return _budget(text, "--eps")  # the task is not known yet ("auto"): the format only
