"""Robust accuracy: how much of an image model's accuracy survives an adversarial attack of size eps.

    clf = duoclass.load("runs/x/model")
    r = clf.evaluate_robust("data/", split="test", attack="pgd", eps=["2/255", "8/255"], steps=10)
    r["clean_accuracy"], r["results"]   # 0.95, [{"eps": 0.00784, "eps_text": "2/255", "accuracy": 0.81, ...}, ...]

    duoclass evaluate runs/x/model data/ --attack pgd --eps 2/255,4/255,8/255 --json       # m["robust"]: that dict
    duoclass evaluate runs/x/model data/ --attack fgsm,pgd,autoattack --eps 8/255 --plot robust.png  # a list of them

Attacks are L-inf and work in [0, 1] pixel space (normalisation is inside the model). Robust
accuracy at eps is the share of examples still classified correctly after the attack; an example
misclassified clean counts as wrong, so eps = 0 gives the clean accuracy. FGSM and PGD come from
attacks.py; AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square) from torchattacks. PGD
figures well above AutoAttack's at the same eps mean the gradients are masked and PGD is not to be
trusted. CPU example: `duoclass evaluate runs/demo/model runs/demo/digits --attack pgd --eps 8/255
--max-examples 100` takes seconds.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from duoclass.errors import DuoclassError
from duoclass.preprocess.image import to_unit
from duoclass.preprocess.load import load_each
from duoclass.robust.attacks import pgd_step_size

log = logging.getLogger("duoclass")

ATTACKS = ("fgsm", "pgd", "autoattack")
DEFAULT_STEPS = 10  # PGD iterations


# --- settings ---------------------------------------------------------------------------------
def parse_eps_list(eps: str | float | Sequence[str | float], flag: str = "--eps") -> list[tuple[float, str]]:
    """(value, text as given) per budget: "2/255,8/255", 0.03, or a list of either."""
    from duoclass.settings.budget import parse_eps

    items: list[Any] = eps.split(",") if isinstance(eps, str) else [eps] if isinstance(eps, (int, float)) else list(eps)
    out = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if text == "":
            raise DuoclassError(f"{flag} {eps}: an empty budget; give comma-separated values, e.g. {flag} 2/255,4/255,8/255")
        out.append((parse_eps(text, flag), str(text)))
    if not out:
        raise DuoclassError(f"{flag}: no budget given; pass e.g. {flag} 2/255,4/255,8/255")
    return out


def parse_attacks(attack: str | Sequence[str]) -> list[str]:
    """Attack names from "pgd", "fgsm,pgd" or a list; each known and given once."""
    names = [a.strip().lower() for a in (attack.split(",") if isinstance(attack, str) else attack)]
    for a in names:
        if a not in ATTACKS:
            raise DuoclassError(f"--attack {a or repr(a)}: unknown attack; choose from: {', '.join(ATTACKS)} "
                                "(several as a comma list, e.g. --attack fgsm,pgd)")
    if len(set(names)) != len(names):
        raise DuoclassError(f"--attack {','.join(names)}: an attack is named twice; name each once")
    if not names:
        raise DuoclassError(f"--attack: no attack given; choose from: {', '.join(ATTACKS)}")
    return names


def check_positive(value: int | None, flag: str, example: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise DuoclassError(f"{flag} {value}: must be a whole number >= 1, e.g. {flag} {example}")


# --- reading a split --------------------------------------------------------------------------
@dataclass
class LabelledImages:
    """A split read with the classifier's preprocessor: what the model sees at prediction time."""

    pixels: np.ndarray  # uint8 (N, 3, S, S)
    labels: np.ndarray  # int64 (N,), indices into the classifier's classes_
    names: list[str]  # the image refs, for messages and CSVs
    skipped: int  # unreadable images left out (each logged)


def require_image_model(clf: Any, what: str, fix: str) -> None:
    """One clear error when `clf` is not a torch image model (e.g. an attack on a text model)."""
    clf._check()
    if clf.task != "image":
        raise DuoclassError(f"{what}: {clf.config_['model']['name']} is a text model, and this works on images in "
                            f"[0, 1] pixel space; {fix}")
    if clf.model is None:
        raise DuoclassError(f"{what}: needs the torch backend (the model's gradients and outputs); load with backend='torch'")


def read_labelled_images(clf: Any, data: str | Path, split: str = "test", max_examples: int | None = None,
                         path_column: str | None = None, label_column: str | None = None) -> LabelledImages:
    """The images and labels of a split. With `max_examples`, N images spread evenly over the split in its
    listed order (so a class-sorted folder keeps every class); unreadable ones are skipped and counted."""
    from duoclass.data.sources import display, labelled_split, read_image_dataset
    from duoclass.data.splits import label_ids
    from duoclass.data.text_files import holds_text

    check_positive(max_examples, "--max-examples", "200")
    if holds_text(data, "text", path_column or "path"):
        raise DuoclassError(f"{data}: holds text data, but this is an image model ({clf.config_['model']['name']}); "
                            "pass an image dataset")
    pre = clf.preprocessor
    ds = read_image_dataset(data, path_column or getattr(pre, "path_column", "path"),
                            label_column or getattr(pre, "label_column", "label"))
    items, split = labelled_split(ds, split, data)
    labels = label_ids([y for _, y in items], clf.classes_, f"{data} ({split} split)")
    idx = range(len(items))
    if max_examples and max_examples < len(items):
        idx = np.unique(np.linspace(0, len(items) - 1, max_examples).round().astype(int)).tolist()
    encoded, errors = load_each(clf.preprocessor, [ref for ref, _ in items], idx)
    for e in errors.values():
        log.warning("skipped %s", e)
    skipped = len(errors)
    pixels = list(encoded.values())
    ys = [labels[i] for i in encoded]
    names = [display(items[i][0]) for i in encoded]
    if not pixels:
        why = f"none of its {skipped} images could be read (see the warnings above)" if skipped else "it has no examples"
        raise DuoclassError(f"{data} ('{split}' split): nothing to evaluate: {why}; fix the files or pass another --split")
    return LabelledImages(np.stack(pixels), np.asarray(ys, dtype=np.int64), names, skipped)


# --- attacking ----------------------------------------------------------------------------------
def _pixel_model(model: Any) -> Any:
    """The model as a function of the pixel tensor alone, which is what torchattacks calls."""
    from torch import nn

    class PixelModel(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):  # noqa: ANN001, ANN202  (B, 3, H, W) in [0, 1] -> logits (B, C)
            return self.inner({"pixel_values": x})

    # the wrapper takes the model's mode: torchattacks restores the mode it finds on the module it is given
    return PixelModel(model).train(model.training)


@contextlib.contextmanager
def _no_weight_grads(params: list[Any]) -> Iterator[None]:
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def attack_batch(name: str, model: Any, x: Any, y: Any, eps: float, steps: int, n_classes: int, seed: int) -> Any:
    """Adversarial examples (B, 3, H, W) in [0, 1] for one batch; `model` takes {"pixel_values": x}."""
    from duoclass.robust.attacks import fgsm, pgd

    if name == "fgsm":
        return fgsm(model, x, y, eps)
    if name == "pgd":
        return pgd(model, x, y, eps, steps=steps, alpha=pgd_step_size(eps, steps), norm="linf", random_start=True)
    try:
        import torchattacks
    except ImportError:
        raise DuoclassError("--attack autoattack: needs torchattacks; install it with `pip install --no-deps torchattacks` (its only needs, torch, numpy and scipy, come with duoclass)") from None
    if eps == 0:  # nothing to search; torchattacks' step sizes divide by eps
        return x
    net = _pixel_model(model)
    if n_classes >= 4:
        aa = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed)
    else:  # APGD-T's targeted DLR loss needs 4 classes; the rest of the standard suite, with the same settings
        aa = torchattacks.MultiAttack([
            torchattacks.APGD(net, norm="Linf", eps=eps, loss="ce", n_restarts=1, seed=seed),
            torchattacks.FAB(net, norm="Linf", eps=eps, multi_targeted=False, n_classes=n_classes, n_restarts=1, seed=seed),
            torchattacks.Square(net, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed),
        ])
    return aa(x, y)


def autoattack_components(n_classes: int | None) -> list[str]:
    """The attacks AutoAttack runs: the standard four; below 4 classes APGD-T (its targeted DLR loss
    needs 4) is left out and FAB runs untargeted (with 2 classes the only target is the other class)."""
    if n_classes is None or n_classes >= 4:
        return ["apgd-ce", "apgd-t", "fab-t", "square"]
    return ["apgd-ce", "fab", "square"]


def attack_settings(name: str, steps: int | None, n_classes: int | None = None) -> dict[str, Any]:
    """What the result of one attack records beside its figures."""
    if name == "fgsm":
        return {"attack": "fgsm", "norm": "linf", "steps": 1, "step_size": "eps", "random_start": False}
    if name == "pgd":
        return {"attack": "pgd", "norm": "linf", "steps": steps, "step_size": "2.5 * eps / steps", "random_start": True}
    return {"attack": "autoattack", "norm": "linf", "version": "standard", "steps": None, "step_size": None,
            "random_start": True, "components": autoattack_components(n_classes)}


def robust_accuracy(model: Any, images: LabelledImages, attack: str, budgets: Sequence[tuple[float, str]],
                    steps: int | None = None, batch_size: int = 64, seed: int = 0,
                    n_classes: int | None = None, classify: Callable[[Any], np.ndarray] | None = None) -> dict[str, Any]:
    """Clean and robust accuracy of a torch module (taking {"pixel_values": x}) under one attack, per eps.

    The attack differentiates `model`; the clean and the attacked images are then classified by `classify`
    ({"pixel_values": float32 array in [0, 1]} -> probabilities): `Classifier.predict_batch`, the one predict
    path, so a model evaluated with test-time augmentation is judged the way `evaluate` judges it. Without
    `classify`, the module's own argmax.
    """
    import torch

    def label(x: Any) -> Any:
        if classify is None:
            with torch.no_grad():
                return model({"pixel_values": x}).argmax(1)
        return torch.from_numpy(np.asarray(classify({"pixel_values": x.detach().cpu().numpy()})).argmax(1)).to(x.device)

    settings = attack_settings(attack, steps, n_classes)
    steps = settings["steps"] or 0
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(images.labels)
    clean_ok = 0
    robust_ok = [0] * len(budgets)
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    # random starts (PGD) and AutoAttack draw from a seeded generator that leaves the caller's untouched;
    # gradients reach only the inputs (faster, and none are left on the weights)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), _no_weight_grads(params):
            torch.manual_seed(seed)
            for j in range(0, n, batch_size):
                x = torch.from_numpy(to_unit(images.pixels[j : j + batch_size])).to(dev)
                y = torch.from_numpy(images.labels[j : j + batch_size]).to(dev)
                ok = label(x) == y
                if n_classes is None:  # once: the model's number of outputs
                    with torch.no_grad():
                        n_classes = int(model({"pixel_values": x[:1]}).shape[1])
                c = n_classes
                clean_ok += int(ok.sum())
                for k, (eps, _) in enumerate(budgets):
                    x_adv = attack_batch(attack, model, x, y, eps, steps, c, seed)
                    still = label(x_adv.detach()) == y
                    robust_ok[k] += int((ok & still).sum())  # misclassified clean counts as wrong
    finally:
        model.train(was_training)
    results = []
    for (eps, text), r in zip(budgets, robust_ok):
        row = {"eps": eps, "eps_text": text, "accuracy": r / n}
        if attack != "autoattack":
            row["step_size"] = eps if attack == "fgsm" else pgd_step_size(eps, steps)
        results.append(row)
    return {**settings, "seed": seed, "examples": n, "skipped_files": images.skipped, "clean_accuracy": clean_ok / n,
            "results": results, "seconds": round(time.perf_counter() - start, 3)}


def evaluate_attacks(clf: Any, data: str | Path, attack: str | Sequence[str] = "pgd",
                     eps: str | float | Sequence[str | float] = "8/255", split: str = "test", steps: int | None = None,
                     max_examples: int | None = None, batch_size: int = 64, seed: int = 0,
                     path_column: str | None = None, label_column: str | None = None) -> list[dict[str, Any]]:
    """Robust accuracy of `clf` under each attack named, in that order (one result dict per attack), all on the
    same examples. `steps` is PGD's number of iterations (default 10)."""
    names = parse_attacks(attack)
    require_image_model(clf, f"--attack {','.join(names)}", "evaluate a text model without --attack")
    budgets = parse_eps_list(eps)
    check_positive(steps, "--steps", str(DEFAULT_STEPS))
    check_positive(batch_size, "--batch-size", "64")
    if steps is not None and "pgd" not in names:
        raise DuoclassError(f"--steps {steps}: only PGD takes a number of steps, and --attack is {','.join(names)}; "
                            "add pgd to --attack or drop --steps")
    images = read_labelled_images(clf, data, split, max_examples, path_column, label_column)
    out = []
    if "autoattack" in names and clf.device is not None and clf.device.type == "cpu" and len(images.labels) > 100:
        log.warning("--attack autoattack: %d examples on the CPU may take hours (its Square attack makes 5000 queries "
                    "per example that survives); --max-examples 100 or a GPU is faster", len(images.labels))
    for name in names:
        log.info("attacking %d examples with %s at eps %s", len(images.labels), name, ", ".join(t for _, t in budgets))
        r = robust_accuracy(clf.model, images, name, budgets, steps or DEFAULT_STEPS, batch_size, seed, len(clf.classes_),
                            classify=clf.predict_batch)
        out.append({**r, "split": split})
    return out


def evaluate_robust(clf: Any, data: str | Path, split: str = "test", attack: str = "pgd",
                    eps: str | float | Sequence[str | float] = "8/255", steps: int | None = None,
                    max_examples: int | None = None, batch_size: int = 64, seed: int = 0,
                    path_column: str | None = None, label_column: str | None = None) -> dict[str, Any]:
    """Robust accuracy of `clf` under one attack (see evaluate_attacks)."""
    name = parse_attacks(attack)
    if len(name) != 1:
        raise DuoclassError(f"attack={attack!r}: evaluate_robust takes one attack; use evaluate_attacks for several")
    return evaluate_attacks(clf, data, name, eps, split, steps, max_examples, batch_size, seed, path_column,
                            label_column)[0]


# --- reporting ----------------------------------------------------------------------------------
def _runs(robust: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One attack's result, or several, as a list."""
    return [robust] if isinstance(robust, Mapping) else list(robust)


def summary_lines(robust: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[str]:
    """Human-readable lines for one result of evaluate_robust, or the list evaluate_attacks returns."""
    lines = []
    for r in _runs(robust):
        how = {"fgsm": "one step", "pgd": f"{r['steps']} steps of 2.5*eps/steps, random start",
               "autoattack": "standard: apgd-ce, apgd-t, fab-t, square"}[r["attack"]]
        lines.append(f"{r['attack']} (L-inf, {how}) on {r['examples']} examples: clean accuracy {r['clean_accuracy']:.4f}"
                     f"  ({r['seconds']:.1f}s)")
        lines += [f"  eps {row['eps_text']:>8} = {row['eps']:.5f}  robust accuracy {row['accuracy']:.4f}" for row in r["results"]]
    return lines


def robustness_figure(robust: Mapping[str, Any] | Sequence[Mapping[str, Any]], title: str = "robust accuracy") -> Any:
    """A matplotlib figure of accuracy against eps, one line per attack, each from its clean accuracy (eps 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in _runs(robust):
        rows = sorted(r["results"], key=lambda row: row["eps"])
        eps = [row["eps"] for row in rows]
        acc = [row["accuracy"] for row in rows]
        if not eps or eps[0] > 0:
            eps, acc = [0.0] + eps, [r["clean_accuracy"]] + acc
        ax.plot([e * 255 for e in eps], acc, marker="o", label=f"{r['attack']} ({r['examples']} examples)")
    ax.set_xlabel("eps (L-inf, in 1/255 of the pixel range)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    return fig


def plot_robustness(robust: Mapping[str, Any] | Sequence[Mapping[str, Any]], path: str | Path,
                    title: str = "robust accuracy") -> None:
    """Write robustness_figure as a PNG."""
    import io

    import matplotlib.pyplot as plt

    from duoclass.artifacts.atomic import atomic_write_bytes

    fig = robustness_figure(robust, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
