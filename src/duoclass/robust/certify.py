"""Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019: CERTIFY).

    clf = duoclass.load("runs/x/model")                  # ideally trained with --noise-augment 0.25
    c = clf.certify("data/", sigma=0.25, n=1000, max_examples=100)
    c["certified_accuracy"]   # [{"radius": 0.0, "accuracy": 0.82}, {"radius": 0.25, "accuracy": 0.64}, ...]

    duoclass certify runs/x/model data/ --sigma 0.25 --n 1000 --output certify.csv

The smoothed classifier g(x) predicts the class the model f picks most often on x + N(0, sigma^2 I).
For each image, n0 noisy copies choose the top class cA; n fresh copies count how often f picks it
(k times); pA is the one-sided Clopper-Pearson lower bound on that probability at level alpha. If
pA < 0.5 g abstains; otherwise g provably predicts cA for every input within L2 distance
sigma * Phi^-1(pA) of x (in [0, 1] pixel units), with probability at least 1 - alpha over the noise.
Certified accuracy at r is the share of images classified correctly with radius >= r; abstentions
count as wrong. Noise is added in [0, 1] pixel space and not clamped, as in the paper, so the model
should have been trained with the same noise (TrainConfig.noise_augment).
"""
from __future__ import annotations

import csv
import io
import sys
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from duoclass.errors import DuoclassError
from duoclass.preprocess.image import to_unit
from duoclass.report.heartbeat import Heartbeat

log = logging.getLogger("duoclass")

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Certificate:
    """The smoothed classifier's answer for one input."""

    prediction: int | None  # class index, or None when it abstains
    radius: float | None  # certified L2 radius in [0, 1] pixel units (None when it abstains)
    p_lower: float  # lower confidence bound on the top class's probability under noise
    count: int  # of the n noisy samples, how many the model gave the top class


def check_settings(sigma: float, n: int, n0: int, alpha: float, batch_size: int) -> None:
    """One error naming the flag for each bad setting."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise DuoclassError(f"--sigma {sigma}: must be > 0, the noise level in [0, 1] pixel units the model was "
                            "trained with, e.g. --sigma 0.25")
    for flag, v, example in (("--n", n, "1000"), ("--n0", n0, "100"), ("--batch-size", batch_size, "200")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DuoclassError(f"{flag} {v}: must be a whole number >= 1, e.g. {flag} {example}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise DuoclassError(f"--alpha {alpha}: must be in (0, 1), the chance a certificate is wrong, e.g. --alpha 0.001")
    if lower_confidence_bound(n, n, alpha) < 0.5:  # even n agreeing samples cannot certify anything
        need = math.ceil(math.log(alpha) / math.log(0.5))
        raise DuoclassError(f"--n {n}: too few samples to certify anything at --alpha {alpha} (every image would "
                            f"abstain); use --n {need} or more, e.g. --n 1000")


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion, k successes in n."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def sample_counts(model: Any, x: Any, num: int, sigma: float, batch_size: int, gen: Any) -> np.ndarray:
    """How often the model predicts each class on `num` copies of x (3, H, W) plus N(0, sigma^2) noise."""
    import torch

    counts = None
    left = num
    while left > 0:
        b = min(batch_size, left)
        batch = x.unsqueeze(0).expand(b, *x.shape)
        noise = torch.randn(batch.shape, generator=gen, device=x.device, dtype=x.dtype) * sigma
        logits = model({"pixel_values": batch + noise})  # no clamp: the certificate is for exactly this noise
        c = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
        counts = c if counts is None else counts + c
        left -= b
    return counts.cpu().numpy()  # type: ignore[union-attr]


def certify_pixels(model: Any, x: Any, sigma: float, n: int = 1000, n0: int = 100, alpha: float = 0.001,
                   batch_size: int = 200, seed: int = 0) -> list[Certificate]:
    """CERTIFY for each image of x, float (N, 3, H, W) in [0, 1] on the model's device; `model` takes
    {"pixel_values": x} and returns scores (B, C) whose argmax is its vote: a torch module's logits, or
    `certify`'s wrapper of the one predict path. Seeded: the same seed gives the same certificates."""
    import torch
    from scipy.stats import norm

    check_settings(sigma, n, n0, alpha, batch_size)
    if hasattr(model, "eval"):
        model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    beat = Heartbeat("certified images", len(x))
    with torch.inference_mode():
        for i, xi in enumerate(x):
            beat.beat(i)
            top = int(np.argmax(sample_counts(model, xi, n0, sigma, batch_size, gen)))  # selection samples
            counts = sample_counts(model, xi, n, sigma, batch_size, gen)  # fresh samples for the estimate
            k = int(counts[top])
            p = lower_confidence_bound(k, n, alpha)
            if p < 0.5:
                out.append(Certificate(None, None, p, k))
            else:
                out.append(Certificate(top, float(sigma * norm.ppf(p)), p, k))
    return out


def certified_accuracy(correct: Sequence[bool], radii: Sequence[float | None], r: float) -> float:
    """Share of inputs classified correctly with certified radius >= r (an abstention, radius None, is wrong)."""
    if not len(correct):
        return 0.0
    return sum(bool(c) and rad is not None and rad >= r for c, rad in zip(correct, radii)) / len(correct)


def certify(clf: Any, data: str | Path, split: str = "test", sigma: float = 0.25, n: int = 1000, n0: int = 100,
            alpha: float = 0.001, batch_size: int = 200, max_examples: int | None = None, seed: int = 0,
            radii: Sequence[float] = RADII, output: str | Path | None = None, path_column: str | None = None,
            label_column: str | None = None) -> dict[str, Any]:
    """Certify each image of a split (see the module docstring); optionally write the per-image CSV to `output`."""
    import torch

    from duoclass.robust.evaluate import read_labelled_images, require_image_model

    require_image_model(clf, "certify", "certify an image model (randomized smoothing adds Gaussian noise to its pixels)")
    check_settings(sigma, n, n0, alpha, batch_size)
    if any(not isinstance(r, (int, float)) or r < 0 for r in radii):
        raise DuoclassError(f"radii {list(radii)}: each radius must be a number >= 0, e.g. (0, 0.25, 0.5)")
    images = read_labelled_images(clf, data, split, max_examples, path_column, label_column)
    dev = next(clf.model.parameters()).device
    start = time.perf_counter()
    log.info("certifying %d images: sigma %g, n0 %d, n %d, alpha %g", len(images.labels), sigma, n0, n, alpha)
    x = torch.from_numpy(to_unit(images.pixels)).to(dev)

    def vote(batch: dict[str, Any]) -> Any:  # the base classifier is the classifier: the one predict path (TTA included)
        probs = clf.predict_batch({"pixel_values": batch["pixel_values"].cpu().numpy()})
        return torch.from_numpy(probs).to(dev)

    certs = certify_pixels(vote, x, sigma, n, n0, alpha, batch_size, seed)
    seconds = time.perf_counter() - start
    rows = []
    for name, y, c in zip(images.names, images.labels, certs):
        rows.append({"input": name, "label": clf.classes_[y],
                     "prediction": None if c.prediction is None else clf.classes_[c.prediction],
                     "abstained": c.prediction is None, "count": c.count, "p_lower": c.p_lower, "radius": c.radius,
                     "correct": c.prediction is not None and c.prediction == int(y)})
    correct = [r["correct"] for r in rows]
    rads = [r["radius"] for r in rows]
    result = {
        "split": split, "sigma": sigma, "n": n, "n0": n0, "alpha": alpha, "seed": seed, "norm": "l2",
        "examples": len(rows), "skipped_files": images.skipped, "abstained": sum(r["abstained"] for r in rows),
        "certified_accuracy": [{"radius": float(r), "accuracy": certified_accuracy(correct, rads, r)} for r in sorted(radii)],
        "seconds": round(seconds, 3), "seconds_per_example": round(seconds / len(rows), 4),
        "predictions": rows,
    }
    if output:
        write_csv(rows, output)
    return result


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """One row per image: input,label,prediction,abstained,count,p_lower,radius,correct (prediction and radius
    empty when abstaining)."""
    from duoclass.artifacts.atomic import atomic_write_text, is_stdout

    buf = io.StringIO()
    cols = ["input", "label", "prediction", "abstained", "count", "p_lower", "radius", "correct"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r["input"], r["label"], r["prediction"] or "", str(r["abstained"]).lower(), r["count"],
                    f"{r['p_lower']:.6f}", "" if r["radius"] is None else f"{r['radius']:.6f}", str(r["correct"]).lower()])
    if is_stdout(path):
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
    else:
        atomic_write_text(path, buf.getvalue())


def summary_lines(c: dict[str, Any]) -> list[str]:
    lines = [f"certified {c['examples']} images of the '{c['split']}' split: sigma {c['sigma']}, n0 {c['n0']}, n {c['n']}, "
             f"alpha {c['alpha']}: {c['abstained']} abstained  ({c['seconds']:.1f}s, {c['seconds_per_example']:.3f}s per image)"]
    lines += [f"  certified accuracy at L2 radius {r['radius']:.2f}: {r['accuracy']:.4f}" for r in c["certified_accuracy"]]
    if c["skipped_files"]:
        lines.append(f"skipped {c['skipped_files']} unreadable files")
    return lines

