"""The Quick-start job: train, evaluate and predict on scikit-learn's bundled handwritten digits.

The 1,797 8x8 digit images ship inside scikit-learn, so this runs offline. They are
written as PNGs in an ImageFolder tree so the demo exercises the same path as a
user's own folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("duoclass")


def write_digits(root: Path, seed: int = 0) -> Path:
    """digits -> root/{train,test}/<digit>/NNNN.png (80/20, stratified)."""
    from sklearn.datasets import load_digits

    from duoclass.data.splits import stratified_split

    d = load_digits()
    labels = [str(y) for y in d.target]
    train_idx, test_idx = stratified_split(labels, 0.2, seed)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            folder = root / split / labels[i]
            folder.mkdir(parents=True, exist_ok=True)
            img = (d.images[i] / 16.0 * 255).round().astype(np.uint8)  # values 0..16 -> 0..255
            Image.fromarray(img, "L").save(folder / f"{i:04d}.png")
    return root


def run_demo(output: str | Path = "runs/demo", epochs: int = 12) -> dict:
    from duoclass import api
    from duoclass.infer.csv import predict_to_csv

    out = Path(output)
    data = out / "digits"
    if not (data / "train").is_dir():
        write_digits(data)
        log.info("wrote scikit-learn's digits to %s", data)
    clf = api.train(data, model="msresnet-tiny", image_size=32, epochs=epochs, batch_size=64, lr=3e-3,
                    augment="light", hflip=0.0, output=str(out / "run"), seed=0, progress=False,
                    overwrite=True)
    metrics = clf.evaluate(data, split="test")
    n, _ = predict_to_csv(clf, data / "test", out / "predictions.csv", top_k=3)
    summary = {"test_accuracy": round(metrics["accuracy"], 4), "test_f1_macro": round(metrics["f1_macro"], 4),
               "model_dir": str(out / "run" / "model"), "metrics": str(out / "run" / "metrics.json"),
               "plots": [str(out / "run" / "confusion_matrix.png"), str(out / "run" / "curves.png")],
               "predictions": str(out / "predictions.csv"), "predicted": n}
    print(json.dumps(summary, indent=2))
    return summary
