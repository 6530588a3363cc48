"""Occlusion: hide a part of the input and see how much the model's case for the target class falls. Needs only
a backend's forward pass, so it explains every model on every backend (onnx and onnx-int8 included) without torch.

    heat, details = occlude_image(scores_of, x, target)       # x float32 (3, S, S) in [0, 1] -> (S, S)
    scores, spans, details = occlude_text(pre, scores_of, text, target)  # per word: s(text) - s(text without it)

`scores_of(batch)` gives, per input of a batch and per class, the calibrated log-odds log(p / (1 - p))
(infer.explain.log_odds). Log-odds, not probabilities: a confident model's probability sits at 0.9999 whether
a patch is hidden or not (it saturates), while its log-odds still fall by how much evidence was hidden.
Variants run in batches of `batch_size`, so memory stays that of one batch.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from duoclass.preprocess.text import word_spans

ScoresOf = Callable[[Mapping[str, Any]], np.ndarray]


def image_patch(size: int) -> tuple[int, int]:
    """The occluding square and its stride for images of `size` px: about an eighth of the side, half overlapping
    (28 px: 4 and 2, 224 px: 28 and 14), so every image costs about 13 x 13 forward passes whatever its size."""
    patch = max(2, round(size / 7))
    return patch, max(1, patch // 2)


def _starts(size: int, patch: int, stride: int) -> list[int]:
    out = list(range(0, max(1, size - patch + 1), stride))
    if out[-1] != max(0, size - patch):  # the last window reaches the edge
        out.append(max(0, size - patch))
    return out


def occlude_image(scores_of: ScoresOf, x: np.ndarray, target: int, patch: int | None = None,
                  stride: int | None = None, batch_size: int = 64) -> tuple[np.ndarray, dict[str, Any]]:
    """Per pixel, the mean fall of the target's log-odds over the windows that hide it (float32 (S, S);
    negative where hiding raises it). A window is filled with the image's mean colour, so it hides content
    without adding an edge the model could read as one."""
    size = x.shape[-1]
    default_patch, default_stride = image_patch(size)
    patch, stride = patch or default_patch, stride or default_stride
    fill = x.mean(axis=(1, 2), keepdims=True)
    starts = _starts(size, patch, stride)
    windows = [(r, c) for r in starts for c in starts]
    base = float(scores_of({"pixel_values": x[None]})[0, target])
    heat = np.zeros((size, size), dtype=np.float64)
    count = np.zeros((size, size), dtype=np.float64)
    for j in range(0, len(windows), batch_size):
        chunk = windows[j : j + batch_size]
        xb = np.repeat(x[None], len(chunk), axis=0)
        for k, (r, c) in enumerate(chunk):
            xb[k, :, r : r + patch, c : c + patch] = fill
        p = scores_of({"pixel_values": xb})[:, target]
        for k, (r, c) in enumerate(chunk):
            heat[r : r + patch, c : c + patch] += base - float(p[k])
            count[r : r + patch, c : c + patch] += 1
    details = {"patch": patch, "stride": stride, "fill": "image mean", "forward_passes": len(windows) + 1,
               "output": "log-odds", "base": base}
    return (heat / np.maximum(count, 1)).astype(np.float32), details


def occlude_text(pre: Any, scores_of: ScoresOf, text: str, target: int, batch_size: int = 64,
                 max_words: int = 512) -> tuple[np.ndarray, list[tuple[int, int]], dict[str, Any]]:
    """Leave one word out: per word (its span in `text`), the target's log-odds for the whole text minus those of
    the text without the word. Words past `max_words` (beyond what a model reads) are not scored; `details` says
    how many were left."""
    spans = word_spans(text)
    kept = spans[:max_words]
    variants = [text] + [text[:s] + text[e:] for s, e in kept]
    encoded = pre.encode(variants)
    p = np.concatenate([scores_of(pre.collate(encoded[j : j + batch_size]))[:, target]
                        for j in range(0, len(encoded), batch_size)])
    details = {"unit": "word", "forward_passes": len(variants), "output": "log-odds", "base": float(p[0]),
               "words_not_scored": len(spans) - len(kept)}
    return (p[0] - p[1:]).astype(np.float32), kept, details
