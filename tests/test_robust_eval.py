"""Robust evaluation: FGSM, PGD and AutoAttack accuracy of a small real image model, through the API and the CLI.

The model is msresnet-tiny at 16 px trained briefly on scikit-learn's digits; it is weak, which suits attacks:
some examples survive small budgets and few survive large ones.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import duoclass
from duoclass.cli import commands as cli
from duoclass.errors import DuoclassError

from .test_text import make_toy

pytestmark = pytest.mark.timeout(300)

FAST = dict(progress=False, tensorboard=False, device="cpu", seed=0, explain_examples=0)


def trained(tmp_path_factory: pytest.TempPathFactory, name: str, data: Path, **kw) -> duoclass.Classifier:
    """Train once per test session (this module and test_certify share the folder), then load."""
    out = tmp_path_factory.getbasetemp() / "robust-models" / name
    if (out / "model" / "config.json").is_file():
        return duoclass.load(out / "model", device="cpu")
    return duoclass.train(data, output=str(out), **kw, **FAST)


def digits_subset(digits: Path, root: Path, per_class: int) -> Path:
    """root/{train,test}/<digit>/: the first `per_class` images of each class of each split."""
    for split in ("train", "test"):
        for cdir in sorted((digits / split).iterdir()):
            (root / split / cdir.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cdir.iterdir())[:per_class]:
                shutil.copy(f, root / split / cdir.name / f.name)
    return root


@pytest.fixture(scope="module")
def digits_model(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    return trained(tmp_path_factory, "digits-msresnet-tiny", digits, model="msresnet-tiny", image_size=16, epochs=2,
                   augment="none")


@pytest.fixture(scope="module")
def toy_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy(tmp_path_factory.getbasetemp() / "robust-models" / "toy-text", 60, 20)


@pytest.fixture(scope="module")
def text_model(toy_text: Path, tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    return trained(tmp_path_factory, "toy-tfidf-mlp", toy_text, model="tfidf-mlp", epochs=1, batch_size=16)


@pytest.fixture(scope="module")
def small(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 test images per digit, plus one file in test/3/ that is not an image."""
    root = digits_subset(digits, tmp_path_factory.mktemp("small") / "digits", 3)
    (root / "test" / "3" / "broken.png").write_bytes(b"this is not a png")
    return root


def model_dir(clf: duoclass.Classifier) -> str:
    return str(clf.folder)


# --- the figures --------------------------------------------------------------------------------
def test_clean_accuracy_and_skips_match_evaluate(digits_model: duoclass.Classifier, small: Path) -> None:
    """The attacked model sees the same pixels as the predict path: eps 0 gives evaluate's accuracy exactly,
    and the unreadable file is skipped and counted the same way."""
    m = digits_model.evaluate(small)
    r = digits_model.evaluate_robust(small, attack="pgd", eps=[0, "4/255"], steps=3)
    assert r["examples"] == m["n"] == 30 and r["skipped_files"] == m["skipped_files"] == 1
    assert r["clean_accuracy"] == pytest.approx(m["accuracy"], abs=1e-12)
    assert r["results"][0]["accuracy"] == r["clean_accuracy"]  # the attack ran at eps 0 and changed nothing
    assert 0 < r["clean_accuracy"] < 1  # a model that gives the other tests something to attack


def test_clean_accuracy_matches_evaluate_with_test_time_augmentation(digits: Path, small: Path,
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """Holds: robust evaluation classifies through the one predict path, so on a model evaluated with --tta
    its clean accuracy is evaluate's (it used to run the bare module, without the flip, and disagree)."""
    from duoclass.robust.evaluate import read_labelled_images, robust_accuracy

    clf = trained(tmp_path_factory, "digits-tta", digits,
                  model="msresnet-tiny", image_size=16, epochs=2, augment="none", tta=True)
    assert clf.tta
    m = clf.evaluate(small)
    r = clf.evaluate_robust(small, attack="fgsm", eps=[0], steps=None)
    assert r["clean_accuracy"] == pytest.approx(m["accuracy"], abs=1e-12)
    assert r["results"][0]["accuracy"] == r["clean_accuracy"]
    # the bare module (no flip) scores otherwise on these images: the check above can fail
    bare = robust_accuracy(clf.model, read_labelled_images(clf, small, "test"), "fgsm", [(0.0, "0")])
    assert bare["clean_accuracy"] != pytest.approx(m["accuracy"], abs=1e-12)


def test_robust_not_above_clean_and_pgd_not_above_fgsm(digits_model: duoclass.Classifier, small: Path) -> None:
    eps = ["1/255", "8/255", "32/255"]
    f = digits_model.evaluate_robust(small, attack="fgsm", eps=eps)
    p = digits_model.evaluate_robust(small, attack="pgd", eps=eps, steps=10)
    assert f["clean_accuracy"] == p["clean_accuracy"] and f["examples"] == p["examples"]
    for rf, rp in zip(f["results"], p["results"]):
        assert rp["accuracy"] <= rf["accuracy"] <= f["clean_accuracy"], (rf, rp)
    accs = [r["accuracy"] for r in p["results"]]
    assert accs == sorted(accs, reverse=True)  # a bigger budget never helps the model
    assert accs[-1] < p["clean_accuracy"]  # the attack really changes predictions


class Bowl(nn.Module):
    """Class 0's logit is 1000 (x0 - 0.5)^2, class 1's is 2: at x0 = 0.52 the model says 1, and FGSM, stepping
    x0 down by 0.1 to lower class 0's logit, overshoots to 0.42, where it says 0."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # where the device is read from

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["pixel_values"][:, 0, 0, 0]
        return torch.stack([1000 * (x0 - 0.5) ** 2, torch.full_like(x0, 2.0)], dim=1)


def test_misclassified_clean_counts_as_wrong() -> None:
    from duoclass.robust.evaluate import LabelledImages, robust_accuracy

    pixels = np.full((1, 3, 4, 4), 133, dtype=np.uint8)  # x0 = 0.52
    r = robust_accuracy(Bowl(), LabelledImages(pixels, np.array([0]), ["x"], 0), "fgsm", [(0.1, "0.1")])
    assert Bowl()({"pixel_values": torch.full((1, 3, 4, 4), 0.42)}).argmax(1).item() == 0  # the attack "helps"
    assert r["clean_accuracy"] == 0 and r["results"][0]["accuracy"] == 0


def test_result_shape(digits_model: duoclass.Classifier, small: Path) -> None:
    r = digits_model.evaluate_robust(small, attack="pgd", eps="2/255,8/255", steps=4, max_examples=10)
    assert {k: r[k] for k in ("attack", "norm", "steps", "random_start", "examples", "split")} == {
        "attack": "pgd", "norm": "linf", "steps": 4, "random_start": True, "examples": 10, "split": "test"}
    assert r["step_size"] == "2.5 * eps / steps"
    assert [row["eps_text"] for row in r["results"]] == ["2/255", "8/255"]
    assert [row["eps"] for row in r["results"]] == pytest.approx([2 / 255, 8 / 255])
    assert [row["step_size"] for row in r["results"]] == pytest.approx([2.5 * 2 / 255 / 4, 2.5 * 8 / 255 / 4])
    json.dumps(r)  # JSON-safe as it is


def test_max_examples_spreads_over_the_classes(digits_model: duoclass.Classifier, small: Path) -> None:
    from duoclass.robust.evaluate import read_labelled_images

    imgs = read_labelled_images(digits_model, small, "test", max_examples=10)
    assert len(imgs.labels) == 10 and len(set(imgs.labels.tolist())) == 10  # the folder lists images class by class


def test_seeded(digits_model: duoclass.Classifier, small: Path) -> None:
    """PGD's random start is seeded: the same seed gives the same figures, and the caller's RNG is untouched."""
    import torch

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = digits_model.evaluate_robust(small, attack="pgd", eps="4/255", steps=2, seed=5)
    assert torch.rand(1) == before
    b = digits_model.evaluate_robust(small, attack="pgd", eps="4/255", steps=2, seed=5)
    assert a["results"] == b["results"]


def test_autoattack_on_a_handful(digits_model: duoclass.Classifier, small: Path) -> None:
    """AutoAttack (standard) runs, and finds no more robust accuracy than PGD on the same examples."""
    pytest.importorskip("torchattacks")
    aa = digits_model.evaluate_robust(small, attack="autoattack", eps="8/255", max_examples=6)
    pgd = digits_model.evaluate_robust(small, attack="pgd", eps="8/255", max_examples=6)
    assert aa["version"] == "standard" and aa["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["examples"] + aa["skipped_files"] == 6 and aa["clean_accuracy"] == pgd["clean_accuracy"] > 0
    assert aa["results"][0]["accuracy"] <= pgd["results"][0]["accuracy"] <= aa["clean_accuracy"]
    assert not digits_model.model.training  # the model is left in the mode it was found in


def test_model_mode_is_restored(digits_model: duoclass.Classifier, small: Path) -> None:
    model = digits_model.model
    model.train()
    try:
        digits_model.evaluate_robust(small, attack="fgsm", eps="2/255", max_examples=4)
        assert model.training
    finally:
        model.eval()


# --- the CLI --------------------------------------------------------------------------------------
def test_cli_attacks_json_and_plot(digits_model: duoclass.Classifier, small: Path, tmp_path: Path, capsys) -> None:
    plot = tmp_path / "curve.png"
    rc = cli.main(["-q", "evaluate", model_dir(digits_model), str(small), "--attack", "fgsm,pgd", "--eps", "0,8/255",
                   "--steps", "3", "--json", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0
    m = json.loads(out)
    fgsm, pgd = m["robust"]  # several attacks: a list, in the order given
    assert fgsm["attack"] == "fgsm" and fgsm["steps"] == 1 and pgd["attack"] == "pgd" and pgd["steps"] == 3
    for r in m["robust"]:
        assert r["results"][0]["accuracy"] == r["clean_accuracy"] == pytest.approx(m["accuracy"])  # eps 0 = clean
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_one_attack_json(digits_model: duoclass.Classifier, small: Path, capsys) -> None:
    """One attack: m["robust"] is its result dict, settings beside the figures."""
    rc = cli.main(["-q", "evaluate", model_dir(digits_model), str(small), "--attack", "pgd", "--eps", "2/255,8/255",
                   "--max-examples", "8", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)["robust"]
    assert r["attack"] == "pgd" and r["steps"] == 10 and r["examples"] + r["skipped_files"] == 8
    assert [row["eps_text"] for row in r["results"]] == ["2/255", "8/255"]


def test_cli_text_summary(digits_model: duoclass.Classifier, small: Path, capsys) -> None:
    assert cli.main(["-q", "evaluate", model_dir(digits_model), str(small), "--attack", "fgsm", "--eps", "2/255"]) == 0
    out = capsys.readouterr().out
    assert "fgsm (L-inf, one step) on 30 examples: clean accuracy" in out and "eps    2/255 = 0.00784" in out


@pytest.mark.parametrize("args, message", [
    (["--attack", "cw", "--eps", "8/255"], "--attack cw: unknown attack; choose from: fgsm, pgd, autoattack"),
    (["--attack", "pgd,pgd", "--eps", "8/255"], "--attack pgd,pgd: an attack is named twice"),
    (["--attack", "pgd"], "--attack pgd: needs --eps"),
    (["--attack", "pgd", "--eps", "2/255,,8/255"], "--eps 2/255,,8/255: an empty budget"),
    (["--attack", "pgd", "--eps", "300/255"], "--eps"),
    (["--attack", "fgsm", "--eps", "8/255", "--steps", "5"], "--steps 5: only PGD takes a number of steps"),
    (["--attack", "pgd", "--eps", "8/255", "--steps", "0"], "--steps 0: must be a whole number >= 1"),
    (["--attack", "pgd", "--eps", "8/255", "--max-examples", "0"], "--max-examples 0: must be a whole number >= 1"),
    (["--eps", "8/255"], "--eps: only used with --attack"),
    (["--plot", "x.png"], "--plot: only used with --attack"),
    (["--attack", "pgd", "--eps", "8/255", "--split", "nope"], "no 'nope' split"),
])
def test_cli_errors(digits_model: duoclass.Classifier, small: Path, args: list[str], message: str, capsys) -> None:
    rc = cli.main(["evaluate", model_dir(digits_model), str(small), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_attack_on_a_text_model_is_one_error(text_model: duoclass.Classifier, toy_text: Path, capsys) -> None:
    rc = cli.main(["evaluate", model_dir(text_model), str(toy_text), "--attack", "pgd", "--eps", "8/255"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--attack pgd: tfidf-mlp is a text model" in err[0], err
    with pytest.raises(DuoclassError, match="is a text model"):
        text_model.evaluate_robust(toy_text, attack="fgsm", eps="8/255")


def test_image_model_on_text_data_is_one_error(digits_model: duoclass.Classifier, toy_text: Path) -> None:
    with pytest.raises(DuoclassError, match="holds text data, but this is an image model"):
        digits_model.evaluate_robust(toy_text, eps="8/255")


def test_plot_draws_every_attack(tmp_path: Path) -> None:
    """One line per attack, each from its clean accuracy at eps 0, eps in 1/255 units; the PNG is written."""
    from duoclass.robust.evaluate import plot_robustness, robustness_figure

    row = lambda e, a: {"eps": e, "eps_text": str(e), "accuracy": a}  # noqa: E731
    robust = [{"attack": "pgd", "clean_accuracy": 0.9, "examples": 5, "results": [row(4 / 255, 0.5), row(8 / 255, 0.1)]},
              {"attack": "fgsm", "clean_accuracy": 0.9, "examples": 5, "results": [row(4 / 255, 0.6), row(8 / 255, 0.3)]}]
    fig = robustness_figure(robust)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["pgd (5 examples)", "fgsm (5 examples)"]
    assert lines[0].get_xdata().tolist() == pytest.approx([0, 4, 8]) and lines[0].get_ydata().tolist() == [0.9, 0.5, 0.1]
    assert len(robustness_figure(robust[0]).axes[0].get_lines()) == 1  # one result alone
    plot_robustness(robust, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # Square's 5000 queries take ~40 s on 2 cores: runs with `make test-slow`
def test_autoattack_on_a_two_class_model() -> None:
    """Binary models (chest X-rays) get AutoAttack without APGD-T, whose targeted DLR loss needs 4 classes;
    it still finds no more robust accuracy than PGD, and the record says which attacks ran."""
    pytest.importorskip("torchattacks")
    from duoclass.models import create_model
    from duoclass.robust.evaluate import LabelledImages, robust_accuracy

    torch.manual_seed(0)
    model = create_model("msresnet-tiny", 2, image_size=16).eval()
    rng = np.random.default_rng(0)
    images = LabelledImages(rng.integers(0, 256, (8, 3, 16, 16), dtype=np.uint8),
                            rng.integers(0, 2, 8).astype(np.int64), [f"x{i}" for i in range(8)], 0)
    budgets = [(8 / 255, "8/255")]
    aa = robust_accuracy(model, images, "autoattack", budgets, n_classes=2)
    pgd = robust_accuracy(model, images, "pgd", budgets, steps=10, n_classes=2)
    assert aa["components"] == ["apgd-ce", "fab", "square"]
    assert aa["clean_accuracy"] == pgd["clean_accuracy"] > 0
    assert aa["results"][0]["accuracy"] <= pgd["results"][0]["accuracy"] <= aa["clean_accuracy"]


def test_autoattack_components_follow_the_class_count() -> None:
    from duoclass.robust.evaluate import attack_settings

    assert attack_settings("autoattack", None, 2)["components"] == ["apgd-ce", "fab", "square"]
    assert attack_settings("autoattack", None, 3)["components"] == ["apgd-ce", "fab", "square"]
    assert attack_settings("autoattack", None, 10)["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
