"""Split conformal prediction sets with APS or RAPS scores (Romano et al. 2020; Angelopoulos et al. 2021).

A set of classes per input that holds the true class with probability at least 1 - alpha, over exchangeable data,
whatever the model. Fitted on labelled examples the model did not train on (and that the temperature was not
fitted on): each gets a score, how much probability mass (plus, for RAPS, a penalty per rank past k_reg) one must
take, best class first, to reach its true class, with the true class's own mass counted by a uniform draw u; the
threshold qhat is the ceil((n + 1)(1 - alpha))-th smallest score. A new input's set is every class whose score,
computed the same way, is at most qhat.

    cp = fit_conformal(probs_cal, y_cal, alpha=0.1, score="aps")      # a JSON-safe record for the model folder
    sets = prediction_sets(probs, cp)                                  # [[0], [0, 1], ...] class indices, best first

The randomisation is what makes the coverage exact rather than conservative (with two classes the difference is
large). So that the same input gets the same set every time, u is derived from a hash of the input's probabilities,
not drawn afresh; across inputs it is spread uniformly and does not depend on the label. A set can be empty (the
model puts little mass on every class beyond what u allows): that is a valid answer, "none of these", and is shown.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

SCORES = ("aps", "raps")
RAPS_LAMBDA = 0.01  # the RAPS penalty per rank past k_reg, as in Angelopoulos et al. 2021


def uniforms(probs: np.ndarray) -> np.ndarray:
    """One number in [0, 1) per row, a hash of the row's probabilities (rounded to 6 places, so backends agreeing to
    that precision give the same sets)."""
    rows = np.round(np.asarray(probs, dtype=np.float64), 6)
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "big") / 2.0**64
                     for r in rows])


def _class_scores(probs: np.ndarray, u: np.ndarray, lam: float, k_reg: int) -> np.ndarray:
    """(N, C): the score each class would have as the true class."""
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    cum = np.cumsum(sorted_p, axis=1)
    rank = np.arange(1, p.shape[1] + 1)[None, :]  # 1 for the best class
    s_sorted = cum - u[:, None] * sorted_p + lam * np.maximum(0, rank - k_reg)
    out = np.empty_like(s_sorted)
    np.put_along_axis(out, order, s_sorted, axis=1)
    return out


def _quantile(s: np.ndarray, alpha: float, what: str) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest of the n scores `s`."""
    from duoclass.errors import DuoclassError

    n = len(s)
    need = math.ceil((n + 1) * (1 - alpha))
    if need > n:
        raise DuoclassError(f"--conformal {alpha}: {n} calibration examples{what} are too few for {1 - alpha:.0%} "
                            f"coverage (at least {math.ceil(1 / alpha) - 1} are needed); use a larger ALPHA or more "
                            "validation data")
    return float(np.sort(s)[need - 1])


def fit_conformal(probs: Any, y: Any, alpha: float, score: str = "aps", k_reg: int | None = None,
                  by_class: bool = False) -> dict[str, Any]:
    """The conformal threshold for coverage 1 - alpha, from calibration probabilities and labels. For RAPS, k_reg
    (the rank past which the penalty applies) defaults to the (1 - alpha) quantile of the true class's rank.

    by_class: one threshold per class, each from that class's calibration examples alone (Mondrian, or
    class-conditional, conformal prediction; Vovk et al. 2005). Coverage then holds for every class on its own,
    so it holds whatever the class mix of the data predicted, which the marginal guarantee does not promise when
    the mix differs from the calibration data's."""
    from duoclass.errors import DuoclassError

    if score not in SCORES:
        raise DuoclassError(f"--conformal-score {score}: unknown; choose one of {', '.join(SCORES)}")
    if not 0 < alpha < 1:
        raise DuoclassError(f"--conformal {alpha}: ALPHA is the miss rate allowed, between 0 and 1 (e.g. 0.1 for 90% coverage)")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    lam = RAPS_LAMBDA if score == "raps" else 0.0
    if score == "raps" and k_reg is None:
        ranks = (p > p[np.arange(n), y][:, None]).sum(axis=1) + 1
        k_reg = int(np.quantile(ranks, 1 - alpha, method="higher"))
    k_reg = int(k_reg or 0)
    s = _class_scores(p, uniforms(p), lam, k_reg)[np.arange(n), y]
    out = {"alpha": float(alpha), "score": score, "qhat": _quantile(s, alpha, ""), "lambda": lam, "k_reg": k_reg,
           "n": int(n)} if not by_class else {"alpha": float(alpha), "score": score, "lambda": lam, "k_reg": k_reg,
                                              "n": int(n)}
    if by_class:
        present = set(np.unique(y).tolist())
        missing = [c for c in range(p.shape[1]) if c not in present]
        if missing:
            raise DuoclassError(f"--conformal-by-class: class {missing[0]} has no calibration example; it needs "
                                "labelled held-out examples of every class")
        out["qhat_by_class"] = [_quantile(s[y == c], alpha, f" of class {c}") for c in range(p.shape[1])]
        out["qhat"] = max(out["qhat_by_class"])  # the loosest, for a reader that knows only one threshold
    return out


def prediction_sets(probs: Any, cp: dict[str, Any]) -> list[list[int]]:
    """Each input's set: the class indices whose score is at most qhat, most probable first."""
    p = np.asarray(probs, dtype=np.float64)
    if not len(p):
        return []
    s = _class_scores(p, uniforms(p), cp["lambda"], cp["k_reg"])
    qhat = np.asarray(cp["qhat_by_class"])[None, :] if cp.get("qhat_by_class") is not None else cp["qhat"]
    inside = s <= qhat
    order = np.argsort(-p, axis=1, kind="stable")
    return [[int(c) for c in row if keep[c]] for row, keep in zip(order, inside)]

