"""The one explain path: raw inputs in, one Explanation per input out, each attributions or its own error.

    ex = clf.explain(["a.png", "broken.png"], method="auto", target=None)
    ex[0].label, ex[0].target, ex[0].attributions       # "pneumonia", "pneumonia", float32 (S, S)
    ex[1].error                                          # "broken.png: truncated image ..."
    ex.save("explanations/")                             # PNG / HTML per input, explanations.json

Methods (`method`): "gradcam" and "gradcam++" (image CNNs), "ig" (integrated gradients: images, and transformer
text models on their token embeddings), "occlusion" (any model, any backend: hides a patch or leaves a word out),
"auto": Grad-CAM for CNN image models, integrated gradients for transformer text models, occlusion otherwise and on
the onnx backends. `target`: the class explained (default: each input's predicted label, as `predict` gives it).
Each input is read once by the model's preprocessor; one that cannot be read, or whose explanation fails, gets its
error and the others go on.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from duoclass.errors import DuoclassError
from duoclass.infer.predict import _name, predict_items, predict_views
from duoclass.preprocess.load import Encoded, load_each

log = logging.getLogger("duoclass")

METHODS = ("auto", "gradcam", "gradcam++", "occlusion", "ig")
SIGNED = ("occlusion", "ig")  # methods whose attributions may be negative (evidence against the class)


@dataclass
class Explanation:
    """Why one input got its label: attributions over its pixels (image, (S, S) at the model's input size) or its
    words / tokens (text, one per span), or an error."""

    input: str
    method: str | None = None
    label: str | None = None  # the predicted label, as predict gives it (abstentions included)
    target: str | None = None  # the class explained
    score: float | None = None  # its calibrated probability
    attributions: np.ndarray | None = None
    pixels: np.ndarray | None = None  # images: uint8 (3, S, S), what the model saw
    text: str | None = None  # texts: the text, and the character spans the attributions belong to
    spans: list[tuple[int, int]] | None = None
    details: dict[str, Any] = field(default_factory=dict)  # steps, completeness, patch, forward passes, ...
    error: str | None = None
    truth: str | None = None  # the true label, when known (a run's report)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def signed(self) -> bool:
        return self.method in SIGNED

    def top_units(self, k: int = 5) -> list[dict[str, Any]]:
        """Texts: the k words or tokens with the largest attribution, best first."""
        if self.attributions is None or self.spans is None or self.text is None:
            return []
        order = np.argsort(-self.attributions, kind="stable")[:k]
        return [{"text": self.text[self.spans[i][0]:self.spans[i][1]], "score": float(self.attributions[i])}
                for i in order]

    def to_dict(self, digits: int = 5) -> dict[str, Any]:
        """JSON-safe. Images: `attributions` as rows of the (S, S) map; texts: `tokens` [{text, start, end, score}]."""
        out: dict[str, Any] = {"input": self.input, "method": self.method, "label": self.label,
                               "target": self.target, "score": self.score, "error": self.error}
        if self.truth is not None:
            out["truth"] = self.truth
        if self.attributions is not None:
            a = np.round(self.attributions.astype(np.float64), digits)
            if self.spans is not None:
                out["tokens"] = [{"text": self.text[s:e], "start": s, "end": e, "score": float(v)}  # type: ignore[index]
                                 for (s, e), v in zip(self.spans, a)]
            else:
                out["attributions"] = a.tolist()
        out["details"] = {k: v for k, v in self.details.items() if k not in ("tokens", "spans")}
        return out


class Explanations(list):
    """A list of Explanation, in input order, that can write itself to a folder."""

    def save(self, folder: str | Path) -> list[Path]:
        """Per input a PNG (the image and its overlay) or an HTML page (the highlighted text), named by its position
        and name; and explanations.json with every attribution. Each file is written atomically. Returns the paths."""
        from duoclass.artifacts.atomic import atomic_write_bytes, atomic_write_text
        from duoclass.explain.render import side_by_side, text_page

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, e in enumerate(self):
            if not e.ok:
                continue
            stem = f"{i:04d}-{_safe(e.input)}"
            if e.pixels is not None:
                path = out / f"{stem}.png"
                atomic_write_bytes(path, side_by_side(e.pixels, e.attributions, e.signed))
            else:
                path = out / f"{stem}.html"
                atomic_write_text(path, text_page(e))
            written.append(path)
        path = out / "explanations.json"
        atomic_write_text(path, json.dumps([e.to_dict() for e in self], ensure_ascii=False) + "\n")
        return written + [path]


def _safe(name: str) -> str:
    """A file-name-safe short form of an input's name."""
    stem = Path(name).stem if ("/" in name or "." in name) else name
    return re.sub(r"[^\w.-]+", "_", stem)[:60] or "item"


def log_odds(views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Calibrated log-odds (B, C), log(p_c / (1 - p_c)) = z_c - logsumexp of the other classes' z, of logit views
    (V, B, C) divided by the temperature, averaged over the views. Computed from the logits, so a probability that
    rounds to 1 still has finite, comparable log-odds: every class but the most probable has p <= 0.5, so its
    1 - p is taken from the whole logsumexp without loss; the most probable one's from the others alone."""
    z = views.astype(np.float64) / temperature
    top = z.max(axis=-1, keepdims=True)
    lse = top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True))
    others = lse + np.log1p(-np.minimum(np.exp(z - lse), 0.5))  # log(1 - p_c); exact where p_c <= 0.5
    first = z.argmax(axis=-1)[..., None]
    rest = np.where(np.arange(z.shape[-1]) == first, -np.inf, z)  # the most probable class left out
    rest_top = rest.max(axis=-1, keepdims=True)
    rest_lse = rest_top + np.log(np.exp(rest - rest_top).sum(axis=-1, keepdims=True))
    np.put_along_axis(others, first, rest_lse, axis=-1)
    return (z - others).mean(axis=0).astype(np.float32)


def is_torch(backend: Any) -> bool:
    return getattr(backend, "name", "") == "torch" and getattr(backend, "model", None) is not None


def installed(module: str) -> bool:
    """Whether an optional package can be imported (auto falls back to occlusion without grad-cam or captum)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_method(clf: Any, method: str) -> str:
    """The method that explains this classifier: `method` checked against its task and backend, or "auto"'s choice."""
    if method not in METHODS:
        raise DuoclassError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    torch_model = is_torch(clf.backend)
    if clf.task == "text":
        transformer = getattr(clf.preprocessor, "kind", "") == "hf"
        if method in ("gradcam", "gradcam++"):
            raise DuoclassError(f"--method {method}: Grad-CAM is for image models; for text use --method ig "
                                "(transformers) or --method occlusion")
        if method == "ig" and not transformer:
            raise DuoclassError(f"--method ig: integrated gradients are for transformer text models (token "
                                f"embeddings); {clf.config_['model']['name']} is a bag of n-grams: use --method occlusion")
        if method == "auto":
            return "ig" if transformer and torch_model and installed("captum") else "occlusion"
    elif method == "auto":
        if not torch_model or not installed("pytorch_grad_cam"):
            return "occlusion"
        from duoclass.explain.gradients import cam_layers

        try:
            cam_layers(clf.model, clf.preprocessor.image_size)
            return "gradcam"
        except DuoclassError:
            return "occlusion"
    if method != "occlusion" and not torch_model:
        raise DuoclassError(f"--method {method} needs the model's gradients, which only --backend torch has "
                            f"(this is --backend {getattr(clf.backend, 'name', '?')}); use --method occlusion")
    return method


def target_index(classes: Sequence[str], target: str | None) -> int | None:
    if target is None:
        return None
    names = [str(c) for c in classes]
    if str(target) not in names:
        raise DuoclassError(f"--target {target!r}: not a class of this model (its classes: {', '.join(names)})")
    return names.index(str(target))


# Long on purpose: the one loop over inputs, with each method's call beside it, reads top to bottom.
def explain_items(clf: Any, inputs: Sequence[Any], method: str = "auto", target: str | None = None,
                  names: Sequence[str] | None = None, steps: int = 32, batch_size: int = 64,
                  truths: Sequence[str] | None = None) -> Explanations:
    """One Explanation per input, in input order (see the module docstring). `steps`: integrated gradients'
    first step count (doubled until complete, see gradients.py); `batch_size`: occlusion's forward batch."""
    method = resolve_method(clf, method)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise DuoclassError(f"--steps {steps!r}: integrated gradients need a whole number of steps >= 2, e.g. 32")
    classes = [str(c) for c in clf.classes_]
    fixed = target_index(classes, target)
    pre, backend = clf.preprocessor, clf.backend
    names = list(names) if names is not None else [_name(x, i) for i, x in enumerate(inputs)]
    encoded, errors = load_each(pre, inputs)
    raws = [x.raw if isinstance(x, Encoded) else x for x in inputs]  # an input the caller encoded already
    items = [Encoded(raws[i], encoded[i]) if i in encoded else inputs[i] for i in range(len(inputs))]
    preds = predict_items(pre, backend, classes, items, batch_size, 1, clf.tta, names=names, rule=clf.rule())
    out = Explanations(Explanation(p.input, method=method, error=p.error) for p in preds)

    def scores_of(batch: Mapping[str, Any]) -> np.ndarray:
        return log_odds(predict_views(backend, [batch], clf.tta), clf.temperature)

    targets = {i: fixed if fixed is not None else int(np.argmax(p.probs)) for i, p in enumerate(preds) if p.ok}
    cams = _cams(clf.model, pre, encoded, targets, method, batch_size, out) if method.startswith("gradcam") else {}
    for i, (p, e) in enumerate(zip(preds, out)):
        if not p.ok or not e.ok:
            continue
        t = targets[i]
        e.label, e.target, e.score = p.label, classes[t], float(p.probs[t])  # type: ignore[index]
        if truths is not None:
            e.truth = str(truths[i])
        try:
            if pre.task == "image":
                x = pre.collate([encoded[i]])["pixel_values"]
                e.pixels = encoded[i]
                if method == "occlusion":
                    from duoclass.explain.occlusion import occlude_image

                    e.attributions, e.details = occlude_image(scores_of, x[0], t, batch_size=batch_size)
                elif method == "ig":
                    from duoclass.explain.gradients import integrated_gradients_image

                    e.attributions, e.details = integrated_gradients_image(clf.model, _tensor(clf.model, x), t, steps)
                else:
                    from duoclass.explain.gradients import cam_description

                    e.attributions, e.details = cams[i], {"output": "logit", "layers": cam_description(clf.model)}
            else:
                e.text = raws[i]
                if method == "occlusion":
                    from duoclass.explain.occlusion import occlude_text

                    e.attributions, e.spans, e.details = occlude_text(pre, scores_of, e.text, t, batch_size)
                else:
                    from duoclass.explain.gradients import integrated_gradients_text

                    e.attributions, e.details = integrated_gradients_text(clf.model, pre, e.text, t, steps)
                    e.spans = [tuple(s) for s in e.details["spans"]]
        except DuoclassError as err:
            e.error, e.attributions = f"{p.input}: {err}", None
            log.warning("%s", e.error)
    return out


def _tensor(model: Any, x: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(next(model.parameters()).device)


def _cams(model: Any, pre: Any, encoded: Mapping[int, Any], targets: Mapping[int, int], method: str,
          batch_size: int, out: list[Explanation]) -> dict[int, np.ndarray]:
    """Grad-CAM maps of the usable images, `batch_size` at a time (one forward and backward pass per batch); a
    batch that fails gives each of its images the error."""
    from duoclass.explain.gradients import grad_cam

    idx = sorted(targets)
    maps: dict[int, np.ndarray] = {}
    for j in range(0, len(idx), batch_size):
        chunk = idx[j : j + batch_size]
        x = _tensor(model, pre.collate([encoded[i] for i in chunk])["pixel_values"])
        try:
            for i, m in zip(chunk, grad_cam(model, x, [targets[i] for i in chunk], plus=method == "gradcam++")):
                maps[i] = m
        except DuoclassError as err:
            for i in chunk:
                out[i].error = f"{out[i].input}: {err}"
            log.warning("%s", err)
    return maps


def explain_to_folder(clf: Any, input_path: str | Path, output: str | Path, method: str = "auto",
                      target: str | None = None, steps: int = 32, batch_size: int = 64, text_column: str | None = None,
                      path_column: str | None = None) -> tuple[Explanations, list[Path]]:
    """What `duoclass explain` runs: explain every input of a file, folder, zip or CSV (what `predict` reads; for a
    text model also a text given in place of a path) and save the explanations to `output`. Returns them and the
    files written. Raises DuoclassError (after writing) when not a single input could be explained."""
    from duoclass.infer.csv import csv_inputs

    pre = clf.preprocessor
    column = (text_column or pre.text_column) if clf.task == "text" else (path_column or getattr(pre, "path_column", "path"))
    if clf.task == "text" and not Path(input_path).exists():  # a text typed on the command line
        log.warning("%s is not a file or folder: explaining it as a text", str(input_path)[:60])
        keys, inputs = ["text"], [str(input_path)]
    else:
        keys, inputs, _ = csv_inputs(clf.task, input_path, column)
    ex = explain_items(clf, inputs, method, target, names=keys, steps=steps, batch_size=batch_size)
    written = ex.save(output)
    if inputs and not any(e.ok for e in ex):
        raise DuoclassError(f"{input_path}: none of its {len(ex)} inputs could be explained (see {Path(output) / 'explanations.json'})")
    return ex, written


def pick_examples(probs: np.ndarray, y: np.ndarray, per_class: int, limit: int = 16) -> list[int]:
    """Indices of examples for a report: per class (in class order) its `per_class` most confident correct
    predictions and its `per_class` most confident wrong ones, at most `limit` in all (wrong ones kept first
    when there are too many: they are what a reader looks for)."""
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    right: list[int] = []
    wrong: list[int] = []
    for c in range(probs.shape[1]):
        for keep, ok in ((right, True), (wrong, False)):
            idx = np.flatnonzero((y == c) & ((pred == y) == ok))
            keep += [int(i) for i in idx[np.argsort(-conf[idx], kind="stable")][:per_class]]
    chosen = wrong[: limit] + right[: max(0, limit - len(wrong))]
    return sorted(chosen, key=lambda i: (int(y[i]), int(pred[i] != y[i]), i))


def report_grid(clf: Any, inputs: Sequence[Any], y: np.ndarray, probs: np.ndarray, path: str | Path,
                per_class: int = 2, title: str = "test examples") -> list[Explanation]:
    """A run's explanations.png: a few examples per class, right and wrong (pick_examples), explained by the
    method "auto" picks, in one PNG grid titled with each one's true and predicted label. Returns them."""
    from duoclass.artifacts.atomic import atomic_write_bytes
    from duoclass.explain.render import grid_png

    chosen = pick_examples(probs, y, per_class)
    if not chosen:
        return []
    classes = [str(c) for c in clf.classes_]
    ex = explain_items(clf, [inputs[i] for i in chosen], truths=[classes[int(y[i])] for i in chosen])
    kept = [e for e in ex if e.ok]
    if kept:
        atomic_write_bytes(path, grid_png(kept, f"{title}: why each label ({kept[0].method})"))
    return kept
