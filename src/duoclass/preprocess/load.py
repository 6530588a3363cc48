"""The model folder's preprocessing record (config.json "preprocessing") -> the preprocessor that feeds it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from duoclass.errors import DuoclassError
from duoclass.preprocess.image import ImagePreprocessor
from duoclass.preprocess.text import TextPreprocessor


def preprocessor_from_config(task: str, cfg: dict[str, Any], folder: Path) -> ImagePreprocessor | TextPreprocessor:
    """The preprocessor a model folder describes (config.json's task and preprocessing)."""
    if task == "image":
        return ImagePreprocessor.from_config(cfg, folder)
    if task == "text":
        return TextPreprocessor.from_config(cfg, folder)
    raise DuoclassError(f"{folder}: task {task!r} is not supported by this version of duoclass; upgrade it")


@dataclass(frozen=True)
class Encoded:
    """An input already encoded by the same preprocessor: `raw` as given, `value` what `load` made of it.
    The server encodes each text once, off the model thread, to size its batches by tokens; the predict
    path then uses `value` instead of encoding it again."""

    raw: Any
    value: Any


def load_each(pre: Any, inputs: Sequence[Any], indices: Sequence[int] | None = None,
              budget_s: float | None = None) -> tuple[dict[int, Any], dict[int, str]]:
    """Encode the inputs (those at `indices`, default all) with the preprocessor: ({index: encoded} for the
    usable ones, {index: the one-line reason} for the others). The one "load each input, skip on error" loop:
    prediction, the export and int8 checks, pruning's calibration, robust evaluation, Ray and the server all
    use it, so no input is dropped without its reason.

    `budget_s` (a server's per-request limit): once encoding has cost this many seconds of this thread's CPU,
    the inputs left are not encoded, each with that reason."""
    encoded: dict[int, Any] = {}
    errors: dict[int, str] = {}
    spent = 0.0
    for i in range(len(inputs)) if indices is None else indices:
        if isinstance(inputs[i], Encoded):
            encoded[i] = inputs[i].value
            continue
        if budget_s is not None and spent > budget_s:
            errors[i] = (f"not decoded: earlier items of this request used up its {budget_s:g} s decoding budget; "
                         "send fewer or smaller inputs per request")
            continue
        t0 = time.thread_time()
        try:
            encoded[i] = pre.load(inputs[i])
        except DuoclassError as e:
            errors[i] = str(e)
        spent += time.thread_time() - t0
    return encoded, errors
