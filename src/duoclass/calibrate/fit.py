"""Fitting the calibration a model folder records, from its logits on labelled held-out data (the valid split).

    cal, cp = fit_calibration(views, y, method="temperature", conformal=0.1, score="aps", seed=0)
    # cal: {"method", "temperature", "fitted_on", "n", "nll_before", "nll_after", "ece_before", "ece_after"}
    # cp:  the conformal record (calibrate.conformal.fit_conformal), or None

Without conformal sets the temperature uses every example. With them the examples are halved, stratified by class
and seeded: the temperature is fitted on one half, the conformal threshold on the other, so the sets' coverage
guarantee holds (the threshold's data played no part in the probabilities it thresholds).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from duoclass.calibrate.temperature import calibrated, fit_temperature, nll


def halves(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets covering y, each with about half of every class (seeded)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        a.append(members[: (len(members) + 1) // 2])
        b.append(members[(len(members) + 1) // 2:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def fit_calibration(views: Any, y: Any, method: str = "temperature", conformal: float | None = None,
                    score: str = "aps", seed: int = 0, where: str = "valid",
                    by_class: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The calibration and conformal records of a model from its logits `views` (V, N, C) on labelled data `y`."""
    from duoclass.report.metrics import calibration_metrics

    v = np.asarray(views, dtype=np.float64)
    if v.ndim == 2:
        v = v[None]
    y = np.asarray(y, dtype=np.int64)
    t_idx, c_idx = halves(y, seed) if conformal is not None else (np.arange(len(y)), None)
    t = fit_temperature(v[:, t_idx], y[t_idx]) if method == "temperature" else 1.0
    before, after = calibration_metrics(y[t_idx], calibrated(v[:, t_idx])), calibration_metrics(y[t_idx], calibrated(v[:, t_idx], t))
    cal = {"method": method, "temperature": t,
           "fitted_on": f"{where} ({'one half, stratified' if conformal is not None else 'all'}, seed {seed})",
           "n": int(len(t_idx)), "nll_before": nll(v[:, t_idx], y[t_idx], 1.0), "nll_after": nll(v[:, t_idx], y[t_idx], t),
           "ece_before": before["ece"], "ece_after": after["ece"]}
    cp = None
    if conformal is not None:
        from duoclass.calibrate.conformal import fit_conformal

        cp = fit_conformal(calibrated(v[:, c_idx], t), y[c_idx], conformal, score, by_class=by_class)
        cp["fitted_on"] = f"{where} (the other half, seed {seed})"
    return cal, cp
