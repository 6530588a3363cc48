"""PNG plots: confusion matrix and training curves (matplotlib, headless)."""
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
