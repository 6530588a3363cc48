"""95% confidence intervals for the headline metrics, by stratified bootstrap over the evaluated examples.

    iv = bootstrap_intervals(y, probs, n_classes, resamples=1000, seed=0)
    iv["accuracy"]        # {"low": 0.905, "high": 0.944}
    iv["method"]          # {"kind": "stratified percentile bootstrap", "resamples": 1000, "seed": 0, "level": 0.95}

Each resample draws, within every true class, as many examples as the class has, with replacement (so every
resample has the split's class mix), and recomputes the metrics; the interval is the 2.5th and 97.5th percentile
of the resampled values. The resampled metrics are computed here with numpy, every resample at once (a resample is a row of example
counts; thousands of scikit-learn calls per split would take seconds); tests/test_uncertainty.py checks each
against scikit-learn's on the same data.
"""
from __future__ import annotations

from typing import Any

import numpy as np

HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "average_precision", "sensitivity", "specificity")


def _weighted_auc(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of `score` for the positives `pos`, for each row of example weights `w` (R, N): the Mann-Whitney
    statistic with ties counted half, computed once over the sorted scores for every resample."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # groups of equal scores
    wp = np.add.reduceat(w[:, order] * pos[order], starts, axis=1)
    wn = np.add.reduceat(w[:, order] * ~pos[order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    denom = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (wp * (below + 0.5 * wn)).sum(axis=1) / denom, np.nan)


def _weighted_ap(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's definition: the precision at each distinct threshold, weighted by the
    recall it adds) for each row of example weights `w` (R, N)."""
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    wp = np.add.reduceat(w[:, order] * pos[order], starts, axis=1)
    wn = np.add.reduceat(w[:, order] * ~pos[order], starts, axis=1)
    tp, fp = np.cumsum(wp, axis=1), np.cumsum(wn, axis=1)
    total = wp.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (wp * precision).sum(axis=1) / total
    return np.where((total > 0) & (wn.sum(axis=1) > 0), ap, np.nan)


def resampled_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int, idx: np.ndarray,
                      only: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The HEADLINE metrics (or `only` these) of each resample, one row of example indices `idx` (R, N) each, as
    scikit-learn computes them (see ranking_metrics and classification_metrics): arrays of R values, NaN where
    a resample cannot give the metric."""
    r, n = idx.shape
    pred = probs.argmax(axis=1)
    out: dict[str, np.ndarray] = {"accuracy": (pred == y)[idx].mean(axis=1)}
    if only == ("accuracy",):
        return out
    codes = (y[idx] * n_classes + pred[idx]) + (np.arange(r) * n_classes * n_classes)[:, None]
    cm = np.bincount(codes.ravel(), minlength=r * n_classes * n_classes).reshape(r, n_classes, n_classes).astype(float)
    support, predicted, tp = cm.sum(axis=2), cm.sum(axis=1), np.diagonal(cm, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = support > 0
        out["balanced_accuracy"] = (recall * present).sum(axis=1) / present.sum(axis=1)
    out["f1_macro"] = f1.mean(axis=1)
    w = np.zeros((r, n))
    np.add.at(w, (np.repeat(np.arange(r), n), idx.ravel()), 1.0)  # how often each example is in each resample
    if n_classes == 2:
        pos = y == 1
        out["roc_auc"], out["average_precision"] = _weighted_auc(pos, probs[:, 1], w), _weighted_ap(pos, probs[:, 1], w)
        out["sensitivity"] = np.where(support[:, 1] > 0, recall[:, 1], np.nan)
        out["specificity"] = np.where(support[:, 0] > 0, recall[:, 0], np.nan)
    else:
        out["roc_auc"] = np.mean([_weighted_auc(y == c, probs[:, c], w) for c in range(n_classes)], axis=0)
        out["average_precision"] = np.mean([_weighted_ap(y == c, probs[:, c], w) for c in range(n_classes)], axis=0)
    return out


def fast_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int,
                 only: tuple[str, ...] | None = None) -> dict[str, float | None]:
    """The HEADLINE metrics (or `only` these) of one set of predictions (resampled_metrics of the identity)."""
    y = np.asarray(y, dtype=np.int64)
    vals = resampled_metrics(y, np.asarray(probs, dtype=np.float64), n_classes, np.arange(len(y))[None, :], only)
    return {k: (None if np.isnan(v[0]) else float(v[0])) for k, v in vals.items()}


def operating_point_figures(p_positive: Any, y_true: Any, threshold: float, resamples: int = 1000, seed: int = 0,
                            level: float = 0.95) -> dict[str, Any]:
    """Sensitivity and specificity of "positive when p >= threshold", with stratified bootstrap intervals."""
    p = np.asarray(p_positive, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    hit = (p >= threshold) == (y == 1)  # a positive called positive, or a negative called negative
    pos, neg = y == 1, y == 0
    out: dict[str, Any] = {"threshold": float(threshold),
                           "sensitivity": float(hit[pos].mean()) if pos.any() else None,
                           "specificity": float(hit[neg].mean()) if neg.any() else None}
    if resamples and len(y) > 1 and pos.any() and neg.any():
        idx = stratified_resamples(y, resamples, seed)
        tail = (1 - level) / 2 * 100
        for k, m in (("sensitivity", pos), ("specificity", neg)):
            vals = (hit & m)[idx].sum(axis=1) / m[idx].sum(axis=1)
            lo, hi = np.percentile(vals, [tail, 100 - tail])
            out[f"{k}_interval"] = {"low": float(lo), "high": float(hi)}
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
    values: dict[str, np.ndarray] = {}
    idx = stratified_resamples(y, resamples, seed)
    for j in range(0, resamples, 250):  # in chunks, so memory stays at 250 x N weights
        for k, v in resampled_metrics(y, p, n_classes, idx[j:j + 250], only).items():
            values[k] = np.concatenate([values.get(k, np.zeros(0)), v])
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {"method": method}
    for k in HEADLINE:
        v = values.get(k, np.zeros(0))
        v = v[~np.isnan(v)]
        if len(v):
            lo, hi = np.percentile(v, [tail, 100 - tail])
            out[k] = {"low": float(lo), "high": float(hi)}
    return out
