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
