"""Randomized smoothing (certify.py): certificates of hand-built models whose answer under noise is known in
closed form, then the API and the CLI on a small real image model; and the noise augmentation it trains with."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from scipy.stats import norm
from torch import nn

import duoclass
from duoclass.cli import commands as cli
from duoclass.robust.certify import certified_accuracy, certify_pixels, lower_confidence_bound
from duoclass.errors import DuoclassError

from .test_robust_eval import digits_model, small, text_model, toy_text  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.timeout(300)


class Constant(nn.Module):
    """Always class 0 of 3, whatever the input."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["pixel_values"]
        return torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)


class Threshold(nn.Module):
    """Class 0 when the first pixel is above 0.5, else class 1: a hyperplane, L2 distance |x0 - 0.5| away."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z = batch["pixel_values"][:, 0, 0, 0] - 0.5
        return torch.stack([z, -z], dim=1)


def image(first_pixel: float) -> torch.Tensor:
    x = torch.full((1, 3, 4, 4), 0.5)
    x[0, 0, 0, 0] = first_pixel
    return x


def test_constant_model_gets_the_bound_of_n_agreeing_samples() -> None:
    """All n samples agree, so pA = alpha ** (1/n) (Clopper-Pearson with k = n) and the radius is sigma * Phi^-1(pA)."""
    sigma, n, alpha = 0.25, 100, 0.001
    certs = certify_pixels(Constant(), torch.rand(3, 3, 8, 8), sigma, n=n, n0=10, alpha=alpha, batch_size=32)
    expected = sigma * norm.ppf(alpha ** (1 / n))
    for c in certs:
        assert c.prediction == 0 and c.count == n
        assert c.p_lower == pytest.approx(alpha ** (1 / n), rel=1e-9)
        assert c.radius == pytest.approx(expected, rel=1e-9)


def test_balanced_classes_abstain() -> None:
    """On the boundary itself the model says 0 or 1 with probability 1/2 each: pA < 0.5, so every answer is an abstention."""
    certs = certify_pixels(Threshold(), image(0.5).repeat(4, 1, 1, 1), 0.25, n=500, n0=50, alpha=0.001, batch_size=100)
    for c in certs:
        assert c.prediction is None and c.radius is None and c.p_lower < 0.5
        assert 150 < c.count < 350  # about half of the samples


def test_radius_is_a_lower_bound_on_the_distance_to_the_boundary() -> None:
    """For a linear boundary at L2 distance d the smoothed classifier's true radius is d; the certificate stays below
    it and, with 2000 samples, close to it."""
    d = 0.1
    (c,) = certify_pixels(Threshold(), image(0.5 + d), 0.25, n=2000, n0=100, alpha=0.001, batch_size=500)
    assert c.prediction == 0
    assert 0.6 * d < c.radius <= d
    (c,) = certify_pixels(Threshold(), image(0.5 - d), 0.25, n=2000, n0=100, alpha=0.001, batch_size=500)
    assert c.prediction == 1 and 0.6 * d < c.radius <= d


class Recording(nn.Module):
    """Threshold's answer (so counts vary from sample to sample), and a copy of every noisy input it is shown,
    filed under the sample_counts call that showed it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, list[torch.Tensor]]] = []  # (num asked for, the batches that call ran)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["pixel_values"]
        self.calls[-1][1].append(x.detach().clone())
        return Threshold()(batch)


def test_selection_and_estimation_use_disjoint_noise_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: CERTIFY chooses the top class from n0 noisy samples and estimates its probability from n OTHER
    samples (reusing the selection samples for the estimate voids the certificate).

    sample_counts is wrapped so every input the model sees is filed under the draw it belongs to: per image, one
    draw of n0 samples that picks the prediction, then one of n fresh samples whose votes are the certificate's
    count; no noisy input of the first draw appears in the second."""
    from duoclass.robust import certify as certify_mod

    model = Recording()
    real = certify_mod.sample_counts

    def recorded(m, x, num, sigma, batch_size, gen):  # type: ignore[no-untyped-def]
        model.calls.append((num, []))
        return real(m, x, num, sigma, batch_size, gen)

    monkeypatch.setattr(certify_mod, "sample_counts", recorded)
    n0, n = 30, 400
    x = torch.cat([image(0.6), image(0.4)])  # 0.1 from the boundary: about 66% of samples vote for the true side
    certs = certify_pixels(model, x, 0.25, n=n, n0=n0, alpha=0.01, batch_size=64)
    assert len(model.calls) == 2 * len(certs), [num for num, _ in model.calls]
    for i, c in enumerate(certs):
        (asked0, chose), (asked, estimated) = model.calls[2 * i], model.calls[2 * i + 1]
        chose_x, estimated_x = torch.cat(chose), torch.cat(estimated)
        assert asked0 == n0 and len(chose_x) == n0
        assert asked == n and len(estimated_x) == n
        # every sample is x_i plus its own noise, and the two draws share none
        assert torch.allclose(chose_x.mean(0), x[i], atol=0.25) and torch.allclose(estimated_x.mean(0), x[i], atol=0.1)
        seen0 = {row.numpy().tobytes() for row in chose_x.flatten(1)}
        seen = {row.numpy().tobytes() for row in estimated_x.flatten(1)}
        assert len(seen0) == n0 and len(seen) == n
        shared = len(seen0 & seen)
        assert shared == 0, f"image {i}: {shared} of the {n0} selection samples were used again for the estimate"
        # the prediction is the n0 draw's majority; the count is the n draw's votes for it
        votes0 = torch.bincount(Threshold()({"pixel_values": chose_x}).argmax(1), minlength=2)
        votes = torch.bincount(Threshold()({"pixel_values": estimated_x}).argmax(1), minlength=2)
        top = int(votes0.argmax())
        assert c.count == int(votes[top])
        assert c.p_lower == pytest.approx(lower_confidence_bound(int(votes[top]), n, 0.01))
        assert c.prediction == (top if c.p_lower >= 0.5 else None)
    assert [c.prediction for c in certs] == [0, 1]  # both certified, on their true side


def test_seeded() -> None:
    x = image(0.55).repeat(2, 1, 1, 1)
    a = certify_pixels(Threshold(), x, 0.25, n=200, n0=20, seed=3)
    assert a == certify_pixels(Threshold(), x, 0.25, n=200, n0=20, seed=3)
    assert a != certify_pixels(Threshold(), x, 0.25, n=200, n0=20, seed=4)


def test_lower_confidence_bound() -> None:
    assert lower_confidence_bound(0, 10, 0.05) == 0.0
    assert lower_confidence_bound(10, 10, 0.05) == pytest.approx(0.05 ** 0.1)
    # the exact binomial tail: P(X >= k | p = bound) = alpha
    from scipy.stats import binom

    p = lower_confidence_bound(70, 100, 0.01)
    assert binom.sf(69, 100, p) == pytest.approx(0.01, rel=1e-6)


def test_certified_accuracy_counts() -> None:
    correct = [True, True, False, True, False]
    radii = [0.1, 0.6, 0.9, None, None]  # the wrong one at 0.9 and the abstentions never count
    assert [certified_accuracy(correct, radii, r) for r in (0, 0.25, 0.5, 0.75)] == [0.4, 0.2, 0.2, 0.0]


# --- the API and the CLI on a real model ------------------------------------------------------------
def test_certify_a_model_folder(digits_model: duoclass.Classifier, small: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "certs.csv"
    c = digits_model.certify(small, sigma=0.12, n=60, n0=10, batch_size=64, max_examples=12, output=out)
    assert c["examples"] + c["skipped_files"] == 12 and len(c["predictions"]) == c["examples"]
    assert [r["radius"] for r in c["certified_accuracy"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    accs = [r["accuracy"] for r in c["certified_accuracy"]]
    assert accs == sorted(accs, reverse=True)  # certified accuracy never grows with the radius
    p = c["predictions"]
    assert c["abstained"] == sum(r["prediction"] is None for r in p)
    assert accs[0] == sum(r["correct"] for r in p) / len(p)
    assert all((r["radius"] is None) == r["abstained"] for r in p)
    assert all(r["correct"] == (r["prediction"] == r["label"]) for r in p)
    assert c["seconds"] > 0 and {"sigma", "n", "n0", "alpha", "seed"} <= set(c)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == [r["input"] for r in p]
    assert [r["prediction"] for r in rows] == [r["prediction"] or "" for r in p]
    json.dumps(c)


def test_cli_certify(digits_model: duoclass.Classifier, small: Path, capsys) -> None:  # noqa: F811
    args = ["-q", "certify", str(digits_model.folder), str(small), "--sigma", "0.12", "--n", "40", "--n0", "5",
            "--max-examples", "5"]
    assert cli.main([*args, "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["sigma"] == 0.12 and c["n"] == 40 and c["examples"] + c["skipped_files"] == 5
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "certified accuracy at L2 radius 0.25:" in out and "abstained" in out


@pytest.mark.parametrize("args, message", [
    (["--sigma", "0"], "--sigma 0.0: must be > 0"),
    (["--sigma", "-0.25"], "--sigma -0.25: must be > 0"),
    (["--sigma", "0.25", "--n", "0"], "--n 0: must be a whole number >= 1"),
    (["--sigma", "0.25", "--n0", "0"], "--n0 0: must be a whole number >= 1"),
    (["--sigma", "0.25", "--n", "5"], "--n 5: too few samples to certify anything at --alpha 0.001"),
    (["--sigma", "0.25", "--alpha", "1.5"], "--alpha 1.5: must be in (0, 1)"),
    (["--sigma", "0.25", "--max-examples", "0"], "--max-examples 0: must be a whole number >= 1"),
    (["--sigma", "0.25", "--split", "nope"], "no 'nope' split"),
])
def test_cli_errors(digits_model: duoclass.Classifier, small: Path, args: list[str], message: str, capsys) -> None:  # noqa: F811
    rc = cli.main(["certify", str(digits_model.folder), str(small), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_certify_a_text_model_is_one_error(text_model: duoclass.Classifier, toy_text: Path, capsys) -> None:  # noqa: F811
    rc = cli.main(["certify", str(text_model.folder), str(toy_text), "--sigma", "0.25"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "certify: tfidf-mlp is a text model" in err[0], err
    with pytest.raises(DuoclassError, match="is a text model"):
        text_model.certify(toy_text)


# --- training with noise ----------------------------------------------------------------------------
def test_noise_augmentation() -> None:
    """Gaussian noise of the asked sigma in [0, 1] pixel space, not clamped; off at 0."""
    from duoclass.settings.augment import Augment
    from duoclass.training.image_data import BatchAugment

    torch.manual_seed(0)
    x = torch.full((64, 3, 16, 16), 0.5)
    aug = BatchAugment(Augment(noise=0.25))
    assert aug
    y = aug({"pixel_values": x})["pixel_values"]
    assert (y - x).mean().abs() < 0.01 and (y - x).std() == pytest.approx(0.25, rel=0.02)
    assert y.min() < 0 and y.max() > 1  # no clamp: the model trains on the noise it is certified under
    assert not BatchAugment(Augment(noise=0.0))
