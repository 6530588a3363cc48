"""The one predict path: raw inputs in, one result per input out, each a prediction or its own error.

    results = predict_items(preprocessor, backend, classes, ["a.png", "broken.png", b"..."], top_k=3)
    results[0].label, results[0].score, results[0].top_k     # "pneumonia", 0.93, [("pneumonia", 0.93), ...]
    results[1].error                                         # "broken.png: truncated image ..."

`Classifier.predict`, `predict_proba`, `__call__` and `evaluate`, the engine's validation,
the CSV writer below and a server all go through `predict_probs` (the only code that runs a
model for prediction) and, for raw inputs, `predict_items`. One unusable input fails only its
own result, never its batch. Nothing here imports torch: a backend (backends.py) runs the model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from duoclass.data.sources import display
from duoclass.errors import DuoclassError
from duoclass.preprocess.load import Encoded, load_each

log = logging.getLogger("duoclass")


@dataclass
class Prediction:
    """The result for one input: a label with its probability and the top-k, or an error."""

    input: str  # what the input was, for messages and CSVs: a path, an id, or "item N"
    label: str | None = None
    score: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    probs: np.ndarray | None = None  # (n_classes,), columns in the classifier's classes_ order
    error: str | None = None
    warning: str | None = None  # the prediction exists but is a guess (e.g. an empty text)
    set: list[str] | None = None  # the conformal prediction set, when the model folder has one (calibrate.conformal)
    abstained: bool = False  # the calibrated top probability was under --abstain-below: label is "abstained"

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: label, score, top_k as [{"label", "score"}], error, warning; `set` when the model has a
        conformal calibration, and `abstained` (true: the label is "abstained", no class)."""
        out = {"input": self.input, "label": self.label, "score": self.score,
               "top_k": [{"label": c, "score": p} for c, p in self.top_k], "error": self.error, "warning": self.warning}
        if self.set is not None:
            out["set"] = self.set
        out["abstained"] = self.abstained
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _flip(x: Any) -> Any:
    """Mirror the last (width) axis of a numpy array or a tensor."""
    return np.ascontiguousarray(x[..., ::-1]) if isinstance(x, np.ndarray) else x.flip(-1)


def predict_views(backend: Any, batches: Iterable[Mapping[str, Any]], tta: bool = False) -> np.ndarray:
    """The logits (V, N, C) of batches of model inputs: one view, or with `tta` two (images and their mirror)."""
    out = []
    for batch in batches:
        z = [np.asarray(backend.run(batch), dtype=np.float32)]
        if tta and "pixel_values" in batch:
            z.append(np.asarray(backend.run({**batch, "pixel_values": _flip(batch["pixel_values"])}), dtype=np.float32))
        out.append(np.stack(z))
    return np.concatenate(out, axis=1) if out else np.zeros((1, 0, 0), dtype=np.float32)


def views_to_probs(views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N, C) of logit views: the mean over views of softmax(logits / temperature)."""
    if not views.shape[1]:
        return np.zeros((0, 0), dtype=np.float32)
    if temperature == 1.0:  # the float32 softmax predict always used: uncalibrated figures stay bit-identical
        return np.mean([softmax(v) for v in views], axis=0).astype(np.float32)
    from duoclass.calibrate.temperature import calibrated

    return calibrated(views, temperature).astype(np.float32)


def predict_probs(backend: Any, batches: Iterable[Mapping[str, Any]], tta: bool = False) -> np.ndarray:
    """Probabilities (N, C) of batches of model inputs: softmax of the logits divided by the backend's calibrated
    `temperature` (1 when it has none); with `tta`, images are averaged with their mirror."""
    return views_to_probs(predict_views(backend, batches, tta), getattr(backend, "temperature", 1.0))


def _name(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return display(os.fspath(item))
    return f"item {i}"


def resolve_top_k(top_k: int | None, n_classes: int) -> int:
    """How many labels each prediction lists: `top_k` capped at the number of classes; None means every label.
    0, a negative number or a non-integer is a clear error."""
    if top_k is None:
        return n_classes
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise DuoclassError(f"top_k={top_k!r}: the number of labels to return must be a whole number >= 1 "
                            "(or None for every label)")
    return max(1, min(int(top_k), n_classes))


def predict_items(pre: Any, backend: Any, classes: Sequence[str], inputs: Sequence[Any], batch_size: int = 64,
                  top_k: int | None = 1, tta: bool = False, names: Sequence[str] | None = None,
                  rule: Any = None) -> list[Prediction]:
    """One Prediction per input, in input order. An input the preprocessor cannot use gets its error;
    the others are predicted in batches of `batch_size` (texts sorted by length, so batches carry little padding).
    `top_k`: how many labels each result lists, best first (None: every label). `rule` (calibrate.decide.Rule):
    conformal sets and abstention."""
    classes = [str(c) for c in classes]  # plain str labels, whether classes is a list or a numpy array
    k = resolve_top_k(top_k, len(classes))
    names = list(names) if names is not None else [_name(x, i) for i, x in enumerate(inputs)]
    results = [Prediction(n) for n in names]

    def encode(idx: Sequence[int]) -> dict[int, Any]:
        encoded, errors = load_each(pre, inputs, idx)
        for i, e in errors.items():
            results[i].error = e
        for i, enc in encoded.items():
            raw = inputs[i].raw if isinstance(inputs[i], Encoded) else inputs[i]
            results[i].warning = pre.warning(raw, enc)
        return encoded

    def run(idx: list[int], encoded: list[Any]) -> None:
        probs = predict_probs(backend, [pre.collate(encoded)], tta)
        for i, p in zip(idx, probs):
            order = np.argsort(-p, kind="stable")[:k]
            r = results[i]
            r.probs, r.label, r.score = p, classes[order[0]], float(p[order[0]])
            r.top_k = [(classes[c], float(p[c])) for c in order]
        if rule is not None:
            rule.apply_all([results[i] for i in idx])

    if pre.task == "text":  # token ids are small: encode everything, then batch by length
        encoded = encode(range(len(inputs)))
        order = length_order(encoded)
        for j in range(0, len(order), batch_size):
            idx = order[j : j + batch_size]
            run(idx, [encoded[i] for i in idx])
    else:  # decoded images are large: one batch in memory at a time
        for j in range(0, len(inputs), batch_size):
            encoded = encode(range(j, min(j + batch_size, len(inputs))))
            if encoded:
                run(list(encoded), list(encoded.values()))
    return results


def length_order(encoded: Mapping[int, Any]) -> list[int]:
    """The order text inputs are batched in: by encoded length, ties in input order."""
    return sorted(encoded, key=lambda i: len(encoded[i]))


def batch_order(pre: Any, inputs: Sequence[Any]) -> list[int]:
    """The order `predict_items` runs inputs in: texts by encoded length (then the unusable ones), images as
    given. Ray hands its workers blocks in this order, so its CSV is the local one, row for row."""
    if pre.task != "text":
        return list(range(len(inputs)))
    encoded, errors = load_each(pre, inputs)
    return length_order(encoded) + sorted(errors)


def probabilities(results: Sequence[Prediction], n_classes: int) -> np.ndarray:
    """(N, C) probabilities of the results; a row of NaN for an input that failed."""
    out = np.full((len(results), n_classes), np.nan, dtype=np.float32)
    for i, r in enumerate(results):
        if r.probs is not None:
            out[i] = r.probs
    return out


def evaluate_results(results: Sequence[Prediction], labels: Sequence[int], classes: list[str], top_k: int = 5,
                     where: str = "", full: bool = False, resamples: int = 0, seed: int = 0,
                     alpha: float | None = None) -> dict[str, Any]:
    """Metrics of predictions against labels (class indices); failed inputs are skipped and counted. `full`: also
    AUC, calibration, risk-coverage and, with `resamples`, intervals (report.metrics.full_metrics); results that
    carry conformal sets add their coverage (classes in `classes` order)."""
    from duoclass.report.metrics import classification_metrics, full_metrics

    kept = [i for i, r in enumerate(results) if r.ok]
    skipped = len(results) - len(kept)
    for r in results:
        if not r.ok:
            log.warning("skipped %s", r.error)
    if not kept:
        why = f"none of its {skipped} inputs could be read (see the warnings above)" if skipped else "it has no examples"
        raise DuoclassError(f"{where}: nothing to evaluate: {why}; fix the files or pass another --split")
    probs = np.stack([results[i].probs for i in kept])  # type: ignore[misc]
    y = np.asarray([labels[i] for i in kept], dtype=np.int64)
    if full or resamples or any(results[i].set is not None for i in kept):
        index = {str(c): j for j, c in enumerate(classes)}
        sets = [[index[c] for c in results[i].set] for i in kept] if results[kept[0]].set is not None else None  # type: ignore[union-attr]
        m = full_metrics(y, probs, [str(c) for c in classes], top_k=top_k, loss=cross_entropy(probs, y),
                         resamples=resamples, seed=seed, sets=sets, alpha=alpha)
    else:
        m = classification_metrics(y, probs, classes, top_k=top_k, loss=cross_entropy(probs, y))
    m["skipped_files"] = skipped
    return m


def cross_entropy(probs: np.ndarray, y: np.ndarray) -> float | None:
    """Mean negative log-probability of the true class (the unweighted, unsmoothed validation loss)."""
    if not len(y):
        return None
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-12, None))))
