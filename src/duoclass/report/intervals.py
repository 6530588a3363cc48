"""95% confidence intervals for the headline metrics, by stratified bootstrap over the evaluated examples.

    iv = bootstrap_intervals(y, probs, n_classes, resamples=1000, seed=0)
    iv["accuracy"]        # {"low": 0.905, "high": 0.944}
    iv["method"]          # {"kind": "stratified percentile bootstrap", "resamples": 1000, "seed": 0, "level": 0.95}

Each resample draws, within every true class, as many examples as the class has, with replacement (so every
resample has the split's class mix), and recomputes the metrics; the interval is the 2.5th and 97.5th percentile
of the resampled values. The resampled metrics are computed here with numpy (thousands of them per split would
take scikit-learn seconds); tests/test_uncertainty.py checks each against scikit-learn's on the same data.
"""
from __future__ import annotations

from typing import Any

import numpy as np

HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "average_precision", "sensitivity", "specificity")


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _auc(pos: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of `score` for the examples where `pos` is true (Mann-Whitney, ties counted half)."""
    from scipy.stats import rankdata

    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ap(pos: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision (scikit-learn's definition: precision at each distinct threshold, weighted by the recall gained)."""
    n_pos = int(pos.sum())
    if not n_pos or n_pos == len(pos):
        return None
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], pos[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each group of equal scores
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    recall_gain = np.diff(np.r_[0.0, tp]) / n_pos
    return float((recall_gain * tp / (tp + fp)).sum())


def fast_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int,
                 only: tuple[str, ...] | None = None) -> dict[str, float | None]:
    """The HEADLINE metrics (or `only` these) of one set of predictions, as scikit-learn computes them (see
    ranking_metrics and classification_metrics for their definitions)."""
    pred = probs.argmax(axis=1)
    if only == ("accuracy",):
        return {"accuracy": float((pred == y).mean())}
    cm = _confusion(y, pred, n_classes).astype(np.float64)
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n_classes), where=denom > 0)
    out: dict[str, float | None] = {"accuracy": float(tp.sum() / len(y)),
                                    "balanced_accuracy": float(recall[support > 0].mean()), "f1_macro": float(f1.mean())}
    if n_classes == 2:
        pos = y == 1
        out["roc_auc"], out["average_precision"] = _auc(pos, probs[:, 1]), _ap(pos, probs[:, 1])
        out["sensitivity"] = float(recall[1]) if support[1] else None
        out["specificity"] = float(recall[0]) if support[0] else None
    else:
        aucs = [_auc(y == c, probs[:, c]) for c in range(n_classes)]
        aps = [_ap(y == c, probs[:, c]) for c in range(n_classes)]
        out["roc_auc"] = float(np.mean(aucs)) if None not in aucs else None  # type: ignore[arg-type]
        out["average_precision"] = float(np.mean(aps)) if None not in aps else None  # type: ignore[arg-type]
    return out


def stratified_resamples(y: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, len(y)) indices: each row draws, within every class of y, as many examples as it has."""
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(y)), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out[:, start:start + len(members)] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        start += len(members)
    return out


def bootstrap_intervals(y_true: Any, probs: Any, n_classes: int, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Percentile intervals of the HEADLINE metrics over stratified bootstrap resamples (see the module docstring).
    A metric a resample cannot give (AUC when a class is missing) leaves that resample out of its interval."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    method = {"kind": "stratified percentile bootstrap", "resamples": int(resamples), "seed": int(seed),
              "level": float(level)}
    if len(y) < 2 or resamples < 1:
        return {"method": method}
    values: dict[str, list[float]] = {}
    for idx in stratified_resamples(y, resamples, seed):
        for k, v in fast_metrics(y[idx], p[idx], n_classes, only).items():
            if v is not None:
                values.setdefault(k, []).append(v)
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {"method": method}
    for k in HEADLINE:
        if values.get(k):
            lo, hi = np.percentile(values[k], [tail, 100 - tail])
            out[k] = {"low": float(lo), "high": float(hi)}
    return out
