"""Pure metric functions on labels and probabilities.

numpy and scikit-learn are imported inside the functions, so the settings (which check
`--select-metric` against `selectable_metrics`) import this module cheaply.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# The float-valued scores of `classification_metrics` that can pick the best checkpoint
# (--select-metric), plus the validation loss. The top-k accuracy is selectable too, under
# the name `topk_name(k)`.
SELECTABLE_METRICS: tuple[str, ...] = (
    "balanced_accuracy", "accuracy",
    "f1_macro", "precision_macro", "recall_macro",
    "f1_weighted", "precision_weighted", "recall_weighted",
    "loss",
)


def topk_name(k: int) -> str:
    """The key of the top-k accuracy in `classification_metrics` (k is capped at the number of classes there)."""
    return f"top{k}_accuracy"


def selectable_metrics(top_k: int = 5) -> list[str]:
    """Every name --select-metric accepts, for --top-k `top_k`."""
    return [*SELECTABLE_METRICS, topk_name(top_k)]


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 5, loss: float | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy; macro/weighted precision, recall, F1; per-class scores; confusion matrix;
    top-k accuracy.

    Balanced accuracy is the mean recall over the classes present in y_true. Unlike accuracy and
    F1 it does not depend on the class mix, so it ranks models the same way on data whose class
    proportions differ from the training data's.

    y_true: (N,) int class ids; probs: (N, C) probabilities.
    """
    import numpy as np
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    labels = list(range(n_classes))
    out: dict[str, Any] = {"n": int(len(y_true))}
    if loss is not None:
        out["loss"] = float(loss)
    out["accuracy"] = float((y_pred == y_true).mean()) if len(y_true) else 0.0
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    present = s > 0
    out["balanced_accuracy"] = float(r[present].mean()) if present.any() else 0.0
    out["per_class"] = {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    k = min(top_k, n_classes)
    if len(y_true):
        topk = np.argsort(-probs, axis=1)[:, :k]
        out[topk_name(k)] = float((topk == y_true[:, None]).any(axis=1).mean())
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["classes"] = list(classes)
    return out


HIGHER_IS_BETTER = {"loss": False}


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if not HIGHER_IS_BETTER.get(metric, True) else new > best


def select(metric: str, score: float, best: float | None, bad_epochs: int) -> tuple[bool, float | None, int]:
    """One epoch's checkpoint decision: (save this epoch as the best model, new best score, epochs without improvement).

    A tie with the best score saves the later epoch (it has trained longer, at a lower learning
    rate on decaying schedules) but does not count as an improvement for early stopping.
    """
    if is_better(metric, score, best):
        return True, score, 0
    return score == best, best, bad_epochs + 1


# --- how well the scores rank, and how well the probabilities are calibrated ------------------------------------
def ranking_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """ROC AUC and average precision (scikit-learn's), and for two classes sensitivity and specificity.

    Two classes: the positive class is the second (classes[1]); "roc_auc" and "average_precision" are its, and
    sensitivity/specificity are at the predicted label (argmax). More classes: one-vs-rest, macro and weighted
    by support ("roc_auc" is the macro figure). Per class: one-vs-rest AUC and AP. A figure a split cannot give
    (a class absent from it) is None.
    """
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    present = np.bincount(y, minlength=n_classes) > 0 if len(y) else np.zeros(n_classes, dtype=bool)
    out: dict[str, Any] = {}
    per: dict[str, dict[str, float | None]] = {}
    for c in range(n_classes):
        pos = y == c
        ok = 0 < pos.sum() < len(y)
        per[classes[c]] = {"roc_auc": float(roc_auc_score(pos, p[:, c])) if ok else None,
                           "average_precision": float(average_precision_score(pos, p[:, c])) if ok else None}
    out["per_class_ranking"] = per
    if n_classes == 2:
        out["positive_class"] = classes[1]
        out["roc_auc"] = per[classes[1]]["roc_auc"]
        out["average_precision"] = per[classes[1]]["average_precision"]
        pred = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64)
        tp, fn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 1)).sum())
        tn, fp = int(((pred == 0) & (y == 0)).sum()), int(((pred == 1) & (y == 0)).sum())
        out["sensitivity"] = tp / (tp + fn) if tp + fn else None
        out["specificity"] = tn / (tn + fp) if tn + fp else None
        return out
    aucs = [per[classes[c]]["roc_auc"] for c in range(n_classes) if present[c]]
    aps = [per[classes[c]]["average_precision"] for c in range(n_classes) if present[c]]
    weights = np.bincount(y, minlength=n_classes)[present] if len(y) else np.zeros(0)
    full = present.all() and len(y) > 0
    out["roc_auc"] = out["roc_auc_macro"] = float(roc_auc_score(y, p, multi_class="ovr", average="macro",
                                                                labels=list(range(n_classes)))) if full else None
    out["roc_auc_weighted"] = float(roc_auc_score(y, p, multi_class="ovr", average="weighted",
                                                  labels=list(range(n_classes)))) if full else None
    if None in aucs or not aucs:
        out["roc_auc"] = out["roc_auc_macro"] = out["roc_auc_weighted"] = None
    out["average_precision"] = out["average_precision_macro"] = (
        float(np.mean(aps)) if aps and None not in aps else None)  # type: ignore[arg-type]
    out["average_precision_weighted"] = (float(np.average(aps, weights=weights))  # type: ignore[arg-type]
                                         if aps and None not in aps else None)
    return out


ECE_BINS = 15


def calibration_metrics(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected and maximum calibration error of the top-class probability (`bins` equal-width bins, as in Guo
    et al. 2017), Brier score (mean over examples of the squared distance between the probability vector and the
    one-hot label, summed over classes) and negative log-likelihood; plus the reliability diagram's bins."""
    import numpy as np

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if not len(y):
        return {"ece": None, "mce": None, "brier": None, "nll": None, "bins": bins, "reliability": []}
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] bins, 0 in the first
    ece, mce, table = 0.0, 0.0, []
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        gap = abs(correct[m].mean() - conf[m].mean())
        ece += m.mean() * gap
        mce = max(mce, gap)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(m.sum()),
                      "confidence": float(conf[m].mean()), "accuracy": float(correct[m].mean())})
    onehot = np.eye(p.shape[1])[y]
    nll = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
    return {"ece": float(ece), "mce": float(mce), "brier": float(((p - onehot) ** 2).sum(axis=1).mean()), "nll": nll,
            "bins": bins, "reliability": table}


def full_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 5, loss: float | None = None,
                 resamples: int = 1000, seed: int = 0, sets: list[list[int]] | None = None,
                 alpha: float | None = None) -> dict[str, Any]:
    """What a final evaluation reports: classification_metrics, ranking_metrics (AUC, average precision, and for
    two classes sensitivity and specificity), "calibration" (calibration_metrics), "intervals" (95% stratified
    bootstrap intervals of the headline metrics, report.intervals; none when resamples is 0) and, given conformal
    sets, "conformal" (coverage against the promised 1 - alpha, mean set size)."""
    from duoclass.report.intervals import bootstrap_intervals

    m = classification_metrics(y_true, probs, classes, top_k=top_k, loss=loss)
    if len(y_true):
        m.update(ranking_metrics(y_true, probs, classes))
        m["calibration"] = calibration_metrics(y_true, probs)
        m["risk_coverage"] = risk_coverage(y_true, probs)
        if resamples:
            m["intervals"] = bootstrap_intervals(y_true, probs, len(classes), resamples=resamples, seed=seed)
    if sets is not None:
        m["conformal"] = {"alpha": alpha, "target_coverage": None if alpha is None else 1 - alpha,
                          **set_coverage(sets, y_true)}
    return m


def set_coverage(sets: list[list[int]], y_true: Any) -> dict[str, float | None]:
    """Of prediction sets (class indices): the share holding the true class, their mean size, the share empty."""
    import numpy as np

    if not len(sets):
        return {"coverage": None, "mean_size": None, "empty": None}
    return {"coverage": float(np.mean([int(t) in s for s, t in zip(sets, y_true)])),
            "mean_size": float(np.mean([len(s) for s in sets])), "empty": float(np.mean([not s for s in sets]))}


ABSTAIN_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def risk_coverage(y_true: np.ndarray, probs: np.ndarray, thresholds: tuple[float, ...] = ABSTAIN_GRID) -> dict[str, Any]:
    """Selective prediction: abstaining when the top probability is under a threshold, the share of inputs
    answered (coverage) and the error rate among them (risk), at each of `thresholds`; and the area under the
    whole risk-coverage curve (AURC; lower is better), answering the most confident first."""
    import numpy as np

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    wrong = (p.argmax(axis=1) != y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    risks = np.cumsum(wrong[order]) / np.arange(1, len(y) + 1)
    curve = []
    for t in thresholds:
        kept = conf >= t
        curve.append({"abstain_below": t, "coverage": float(kept.mean()),
                      "risk": float(wrong[kept].mean()) if kept.any() else None})
    return {"aurc": float(risks.mean()) if len(y) else None, "curve": curve}
