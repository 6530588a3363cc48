"""PNG plots: confusion matrix, training curves, reliability diagram, ROC and precision-recall (matplotlib, headless)."""
from __future__ import annotations

import io
from pathlib import Path

from duoclass.artifacts.atomic import atomic_write_bytes


def _fig_bytes(fig) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_confusion(cm: list[list[int]], classes: list[str], path: str | Path, title: str = "confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(cm)
    n = len(classes)
    size = min(14, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        top = m.max() if m.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > top / 2 else "black", fontsize=8)
    atomic_write_bytes(path, _fig_bytes(fig))
    plt.close(fig)


def plot_curves(history: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in history], label="train loss")
    if "valid_loss" in history[0]:
        a.plot(ep, [r.get("valid_loss") for r in history], label="valid loss")
    a.set_xlabel("epoch")
    a.legend()
    for key in ("valid_accuracy", "valid_f1_macro"):
        if key in history[0]:
            b.plot(ep, [r.get(key) for r in history], label=key.replace("_", " "))
    b.set_xlabel("epoch")
    b.legend()
    atomic_write_bytes(path, _fig_bytes(fig))
    plt.close(fig)


def plot_calibration(cal: dict, path: str | Path, title: str = "reliability") -> None:
    """The reliability diagram of calibration_metrics' bins: accuracy against confidence, with the ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    bins = cal.get("reliability", [])
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins],
           width=[b["high"] - b["low"] for b in bins], edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C1", ms=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-class probability")
    ax.set_ylabel("accuracy")
    before = cal.get("before", {}).get("ece")
    ax.set_title(f"{title}: ECE {cal['ece']:.4f}" + (f" (uncalibrated {before:.4f})" if before is not None else ""), fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    atomic_write_bytes(path, _fig_bytes(fig))
    plt.close(fig)


def plot_ranking(probs, y, classes: list[str], path: str | Path) -> None:  # noqa: ANN001
    """ROC and precision-recall curves (scikit-learn's), of the positive class for two classes, one-vs-rest per
    class (at most 10) otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import precision_recall_curve, roc_curve

    probs = np.asarray(probs)
    y = np.asarray(y)
    shown = [1] if len(classes) == 2 else list(range(min(10, len(classes))))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5))
    for c in shown:
        pos = y == c
        if not 0 < pos.sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, c])
        prec, rec, _ = precision_recall_curve(pos, probs[:, c])
        a.plot(fpr, tpr, label=classes[c])
        b.plot(rec, prec, label=classes[c])
    a.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    a.set_xlabel("false positive rate")
    a.set_ylabel("true positive rate (sensitivity)")
    a.set_title("ROC")
    b.set_xlabel("recall")
    b.set_ylabel("precision")
    b.set_title("precision-recall")
    a.legend(fontsize=7)
    atomic_write_bytes(path, _fig_bytes(fig))
    plt.close(fig)
