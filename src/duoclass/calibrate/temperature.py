"""Temperature scaling (Guo et al. 2017): one parameter T > 0, fitted by minimising the negative log-likelihood of
held-out labels under softmax(logits / T), with L-BFGS. Dividing the logits by T keeps their order, so the
predicted class, the accuracy and the AUC stay the same; only how sure the probabilities are changes.

    T = fit_temperature(views, y)       # views: (V, N, C) logits, V = 2 with test-time augmentation
    probs = calibrated(views, T)         # (N, C): the mean over the views of softmax(view / T)

With test-time augmentation the probabilities are the mean of the two views' softmax, as in predict.predict_probs,
so T is fitted on exactly what the predict path returns.
"""
from __future__ import annotations

from typing import Any

import numpy as np

T_MIN, T_MAX = 0.05, 20.0  # the search range of T (log-space); a fit at either end is reported as such


def calibrated(views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) probabilities: the mean over views of softmax(logits / T), computed in float64."""
    v = np.asarray(views, dtype=np.float64)
    if v.ndim == 2:
        v = v[None]
    z = v / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).mean(axis=0)


def nll(views: np.ndarray, y: np.ndarray, temperature: float) -> float:
    p = calibrated(views, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))


def fit_temperature(views: Any, y: Any) -> float:
    """The T in [T_MIN, T_MAX] that minimises the NLL of `y` (L-BFGS-B on log T, from T = 1)."""
    from scipy.optimize import minimize

    v = np.asarray(views, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if v.ndim == 2:
        v = v[None]
    if not len(y):
        return 1.0

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        t = float(np.exp(x[0]))
        z = v / t
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        s = e / e.sum(axis=-1, keepdims=True)  # (V, N, C)
        p = s.mean(axis=0)
        py = np.clip(p[np.arange(len(y)), y], 1e-300, None)
        # d softmax(z/t)_y / d log t = -s_y (z_y - sum_c s_c z_c) with z = logits / t
        zv = v / t
        ds = -s[:, np.arange(len(y)), y] * (zv[:, np.arange(len(y)), y] - (s * zv).sum(axis=-1))  # (V, N)
        grad = -np.mean(ds.mean(axis=0) / py)
        return float(-np.mean(np.log(py))), np.array([grad])

    r = minimize(objective, x0=np.zeros(1), jac=True, method="L-BFGS-B",
                 bounds=[(np.log(T_MIN), np.log(T_MAX))])
    return float(np.exp(r.x[0]))
