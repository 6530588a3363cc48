"""`Classifier`: a trained model behind a backend, with its preprocessing and class names.

    clf = duoclass.load("runs/xray/model")
    clf(["a.png", "b.png"])                # [{"label": "pneumonia", "score": 0.93}, {...}]       (pipeline style)
    clf(["a.png", "b.png"], top_k=2)      # [[{"label": "pneumonia", "score": 0.93}, {...}], [...]]
    clf.predict(["a.png", "b.png"])        # ["pneumonia", "normal"]                              (scikit-learn style)
    clf.predict_proba(["a.png"])           # (1, n_classes), columns in clf.classes_ order (a numpy array of str)
    clf.predict_results(["a.png"])         # [Prediction(label, score, top_k, error, warning)]
    clf.evaluate("data/xrays", split="test")

Every call goes through the one predict path (predict.predict_items). An input that cannot be
used gets its own error (a NaN row in predict_proba, None in predict, {"error": ...} in the
pipeline call) and a logged warning; the other inputs are predicted as usual. Importing this
module does not import torch; loading a folder with the torch backend does.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from duoclass.artifacts.folder import backend_variant, check_backend_name
from duoclass.errors import DuoclassError, NotFittedError
from duoclass.infer.predict import predict_probs, Prediction, evaluate_results, predict_items, probabilities

log = logging.getLogger("duoclass")



def _as_list(inputs: Any) -> tuple[list[Any], bool]:
    """(inputs as a list, whether a single input was given)."""
    from os import PathLike

    if isinstance(inputs, (str, bytes, bytearray, PathLike)) or not isinstance(inputs, Sequence):
        try:
            from PIL import Image

            single = isinstance(inputs, (str, bytes, bytearray, PathLike, Image.Image, np.ndarray))
        except ImportError:  # pragma: no cover
            single = True
        if single:
            return [inputs], True
        return list(inputs), False
    return list(inputs), False



class SplitInputs(NamedTuple):
    """What `Classifier.split_inputs` reads: the inputs, their display names and label ids, rows skipped for
    empty text, and the name of the split they are (see data.sources.labelled_split)."""

    inputs: list[Any]
    names: list[str]
    labels: list[int]
    skipped: int
    split: str

def temperature_of(cfg: Mapping[str, Any], variant: Mapping[str, Any] | None = None) -> float:
    """The temperature the predict path divides the logits by: the variant's own refit one (quantize and prune
    refit theirs), else the folder's, else 1 (a folder from before calibration, or trained with --calibration none)."""
    for record in ((variant or {}).get("calibration"), cfg.get("calibration")):
        if isinstance(record, Mapping) and "temperature" in record:
            return float(record["temperature"])
    return 1.0


class Classifier:
    """A trained model plus its preprocessing and class names. Build one with `duoclass.load` or `duoclass.train`."""

    def __init__(self, backend: Any, classes: Sequence[str], preprocessor: Any, config: dict[str, Any],
                 folder: Path | None = None):
        self.backend = backend
        self.classes_ = np.asarray([str(c) for c in classes], dtype=str)  # as scikit-learn's: a numpy array of str
        self.preprocessor = preprocessor
        self.config_ = config
        self.folder = folder
        self.result_: Any = None  # engine.RunResult when the classifier came from duoclass.train
        self.summary_: Any = None  # the summary of repeated runs (--folds, --seeds) when the classifier is their kept model

    @classmethod
    def from_folder(cls, path: str | Path, device: str = "auto", backend: str = "torch",
                    threads: int | None = None, max_pixels: int | None = None,
                    max_decode_bytes: int | None = None) -> "Classifier":
        """Load a model folder: every file's hash is checked, nothing is unpickled or executed.

        backend: "torch" (the weights, eager), "onnx" or "onnx-int8" (the folder's ONNX variant on ONNX Runtime,
        written by `duoclass export` / `duoclass quantize`; these need neither torch nor transformers).
        threads: ONNX Runtime's intra-op threads for the onnx backends (default: DUOCLASS_ONNX_THREADS, else
        the cores this process may use); the torch backend ignores it (torch.set_num_threads sets torch's).
        max_pixels: image models: refuse images above this many pixels (at most Pillow's bomb limit); the
        server lowers it to its --max-pixels.
        max_decode_bytes: image models: refuse, before decoding, images whose decoding would take more memory
        than this (estimated from their declared size and pixel format; the server's --max-decode-mb)."""
        from duoclass.artifacts.folder import read_model_config
        from duoclass.preprocess.load import preprocessor_from_config

        folder = Path(path)
        check_backend_name(backend)
        variant = None
        if backend == "torch":
            from duoclass.infer.torch_backend import torch_backend_from_folder
            from duoclass.artifacts.folder import read_model_folder

            cfg, state = read_model_folder(folder)
            runner: Any = torch_backend_from_folder(cfg, state, folder, device)
        else:
            from duoclass.infer.onnx_backend import OnnxBackend

            cfg = read_model_config(folder)
            variant = backend_variant(folder, cfg, backend)
            runner = OnnxBackend(folder / variant["path"], threads=threads, name=backend)
        runner.temperature = temperature_of(cfg, variant)
        pre = preprocessor_from_config(cfg["task"], cfg["preprocessing"], folder)
        if max_pixels is not None and cfg["task"] == "image":
            pre.max_pixels = min(max_pixels, pre.max_pixels)
        if max_decode_bytes is not None and cfg["task"] == "image":
            pre.max_decode_bytes = max_decode_bytes
        return cls(runner, cfg["classes"], pre, cfg, folder)

    # --- what it is ---------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.config_["task"]

    @property
    def tta(self) -> bool:
        """Test-time augmentation the model was evaluated with in training (config.json's evaluation settings)."""
        return bool(self.config_.get("evaluation", {}).get("tta", False))

    @property
    def model(self) -> Any:
        """The torch module (torch backend), e.g. for attacks or export."""
        return getattr(self.backend, "model", None)

    @property
    def device(self) -> Any:
        return getattr(self.backend, "device", None)

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self.classes_[:5].tolist())) + (", ..." if len(self.classes_) > 5 else "")
        name = self.config_.get("model", {}).get("name", "?")
        where = f", folder={str(self.folder)!r}" if self.folder else ""
        return (f"Classifier(task={self.task!r}, model={name!r}, classes=[{shown}] ({len(self.classes_)}), "
                f"preprocessor={self.preprocessor!r}, backend={self.backend!r}{where})")

    def _check(self) -> None:
        if self.backend is None:
            raise NotFittedError("this classifier has no weights; use duoclass.load(MODEL_DIR) or duoclass.train(...)")

    # --- prediction -------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        """The calibrated temperature the predictions use (1: uncalibrated)."""
        return float(getattr(self.backend, "temperature", 1.0))

    @property
    def conformal(self) -> dict[str, Any] | None:
        """The folder's conformal calibration (alpha, score, threshold), or None: predictions then carry no set."""
        return self.config_.get("conformal")

    def rule(self, abstain_below: float | None = None) -> Any:
        """The decision rule of this model's predictions: its conformal sets, and abstention under `abstain_below`."""
        from duoclass.calibrate.decide import Rule

        return Rule(self.classes_.tolist(), self.conformal, abstain_below, self.config_.get("operating_point")).check()

    def predict_results(self, inputs: Any, top_k: int | None = 1, batch_size: int = 64,
                        abstain_below: float | None = None) -> list[Prediction]:
        """One Prediction (label, score, top_k, probs, set, abstained, error, warning) per input, in input order;
        each lists its `top_k` best labels (None: every label, best first). With `abstain_below`, an input whose
        calibrated top probability is under it gets the label "abstained" (abstained=True) instead of a class."""
        self._check()
        rule = self.rule(abstain_below)
        items, _ = _as_list(inputs)
        results = predict_items(self.preprocessor, self.backend, self.classes_, items, batch_size, top_k, self.tta,
                                rule=rule)
        for r in results:
            if r.error:
                log.warning("%s", r.error)
            elif r.warning:
                log.warning("%s: %s", r.input, r.warning)
        return results

    def __call__(self, inputs: Any, top_k: int | None = 1, batch_size: int = 64,
                 abstain_below: float | None = None) -> Any:
        """Pipeline style, like transformers' text-classification pipeline. With top_k=1 (the default) each input
        gives one {"label", "score"}; with top_k=k > 1 a list of its k best (best first), and with top_k=None
        every label, sorted by score. An input that cannot be used gives {"error": ...} in place of its dict
        ([{"error": ...}] in place of its list). A single input gives its own result, a list of inputs a list.
        With a conformal calibration each dict also has "set"; with `abstain_below`, "abstained"."""
        items, single = _as_list(inputs)
        results = self.predict_results(items, top_k, batch_size, abstain_below)

        def one(r: Prediction) -> dict[str, Any]:
            d: dict[str, Any] = {"label": r.label, "score": r.score}
            if r.set is not None:
                d["set"] = r.set
            if abstain_below is not None:
                d["abstained"] = r.abstained
            return d

        if top_k == 1:
            out: list[Any] = [one(r) if r.ok else {"error": r.error} for r in results]
        else:
            out = [[{"label": c, "score": p} for c, p in r.top_k] if r.ok else [{"error": r.error}] for r in results]
        return out[0] if single else out

    def predict_proba(self, inputs: Any, batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape (N, n_classes), columns in `classes_` order; a row of NaN for an unusable input."""
        return probabilities(self.predict_results(inputs, 1, batch_size), len(self.classes_))

    def predict(self, inputs: Any, batch_size: int = 64, abstain_below: float | None = None) -> list[str | None]:
        """Predicted class names, one per input (None for an unusable input, whose error is logged; "abstained"
        for one whose calibrated top probability is under `abstain_below`)."""
        return [r.label for r in self.predict_results(inputs, 1, batch_size, abstain_below)]

    def predict_batch(self, batch: Mapping[str, Any]) -> np.ndarray:
        """Probabilities (B, n_classes) of one batch of model inputs (what the preprocessor's `collate` makes,
        e.g. attacked pixels in [0, 1]), through the one predict path with the folder's evaluation settings
        (test-time augmentation included), so robustness figures at eps 0 equal `evaluate`'s."""
        self._check()
        return predict_probs(self.backend, [batch], tta=self.tta)

    # --- evaluation -----------------------------------------------------------------------
    def split_inputs(self, data: str | Path, split: str = "test", text_column: str | None = None,
                     label_column: str | None = None, path_column: str | None = None
                     ) -> "SplitInputs":
        """A labelled split of a dataset as this model's inputs: (inputs, display names, label ids, rows skipped
        for empty text, the split's name). The data must be of this model's kind (images or text); a folder of
        class folders is one split, evaluated whole (data.sources.labelled_split)."""
        from duoclass.data.splits import label_ids
        from duoclass.data.text_files import holds_text

        pre = self.preprocessor
        text_column = text_column or getattr(pre, "text_column", "text")
        label_column = label_column or getattr(pre, "label_column", "label")
        path_column = path_column or getattr(pre, "path_column", "path")
        is_text = holds_text(data, text_column, path_column)
        if is_text != (self.task == "text"):
            raise DuoclassError(f"{data}: holds {'text' if is_text else 'image'} data, but this is {'a text' if self.task == 'text' else 'an image'} "
                                f"model ({self.config_['model']['name']}); evaluate it on {self.task} data")
        if self.task == "text":
            from duoclass.data.text_files import read_eval_split

            recs, empty, where = read_eval_split(data, split, text_column, label_column)
            inputs, names, raw_labels = [r.text for r in recs], [r.where for r in recs], [r.label for r in recs]
        else:
            from duoclass.data.sources import display, labelled_split, read_image_dataset

            ds = read_image_dataset(data, path_column, label_column)
            items, split = labelled_split(ds, split, data)
            inputs = [ref for ref, _ in items]
            names, raw_labels, where, empty = [display(r) for r in inputs], [y for _, y in items], str(data), 0
        labels = label_ids(raw_labels, self.classes_.tolist(), f"{where} ({split} split)")  # type: ignore[arg-type]
        return SplitInputs(inputs, names, labels, empty, split)

    def evaluate(self, data: str | Path, split: str = "test", batch_size: int = 64, topk_accuracy_k: int | None = None,
                 text_column: str | None = None, label_column: str | None = None,
                 path_column: str | None = None, char_noise: Sequence[float] = (), seed: int = 0, *,
                 top_k: int | None = None, resamples: int = 1000) -> dict[str, Any]:
        """Metrics on a labelled split of a dataset (the layouts `train` reads), evaluated as in training
        (the folder's evaluation settings, config.json "evaluation": test-time augmentation and the k of the
        top-k accuracy), so they reproduce the run's test figures. Unreadable inputs are skipped and counted.

        topk_accuracy_k: the k of m["top{k}_accuracy"] (default: the k the run recorded, else 5). A k other
        than the recorded one is logged as a warning and noted in m["overrides"]; m["topk_accuracy_k"] is the
        k used. `top_k=` is the deprecated name of this parameter (DeprecationWarning).

        char_noise (text models): also accuracy and macro F1 with each test text perturbed at these character
        rates (random deletions, swaps and insertions; text_augment.perturb_chars, seeded by `seed`),
        in m["char_noise"].

        Beside the classification metrics: ROC AUC and average precision (and for two classes sensitivity and
        specificity), calibration (ECE, MCE, Brier, NLL, the reliability diagram's bins), the risk-coverage curve,
        95% stratified bootstrap intervals of the headline metrics (`resamples` resamples seeded by `seed`; 0: none)
        and, when the folder has a conformal calibration, the sets' coverage and mean size."""
        self._check()
        if top_k is not None:
            warnings.warn("Classifier.evaluate(top_k=...) is deprecated: it is the k of the top-k accuracy; "
                          "pass topk_accuracy_k= instead", DeprecationWarning, stacklevel=2)
            if topk_accuracy_k is not None and topk_accuracy_k != top_k:
                raise TypeError("evaluate: pass topk_accuracy_k= (or the deprecated top_k=), not both")
            topk_accuracy_k = top_k
        recorded = self.config_.get("evaluation", {}).get("top_k")
        if topk_accuracy_k is None:
            k = int(recorded or 5)
        elif isinstance(topk_accuracy_k, bool) or not isinstance(topk_accuracy_k, (int, np.integer)) or topk_accuracy_k < 1:
            raise DuoclassError(f"topk_accuracy_k={topk_accuracy_k!r}: the k of the top-k accuracy must be a whole "
                                "number >= 1 (leave it out for the k the training run used)")
        else:
            k = int(topk_accuracy_k)
        classes = self.classes_.tolist()
        pre = self.preprocessor
        inputs, names, labels, empty, split = self.split_inputs(data, split, text_column, label_column, path_column)
        results = predict_items(pre, self.backend, classes, inputs, batch_size, 1, self.tta, names=names,
                                rule=self.rule())
        m = evaluate_results(results, labels, classes, k, f"{data} ('{split}' split)", full=True, resamples=resamples,
                             seed=seed, alpha=(self.conformal or {}).get("alpha"))
        m["split"] = split
        m["temperature"] = self.temperature
        op = self.config_.get("operating_point")
        if op is not None:  # the labels predict gives: thresholded, with their own sensitivity and specificity
            from duoclass.report.intervals import operating_point_figures

            kept = [(r.probs[1], y) for r, y in zip(results, labels) if r.probs is not None]
            m["operating_point"] = {**op, **operating_point_figures([p for p, _ in kept], [y for _, y in kept],
                                                                    op["threshold"], resamples, seed)}
        m["skipped_files"] += empty  # text rows with empty text are skipped when reading, as in training
        m["tta"] = self.tta
        m["topk_accuracy_k"] = k
        if recorded is not None and k != recorded:  # not the run's setting: say so, never silently
            m["overrides"] = {"top_k": {"recorded": recorded, "used": k}}
            log.warning("evaluate: top-%d accuracy, not the top-%d the training run recorded (config.json "
                        "evaluation.top_k), so %s is not in the run's metrics.json; the other figures are unaffected",
                        k, recorded, f"top{min(k, len(classes))}_accuracy")
        if char_noise:
            if self.task != "text":
                raise DuoclassError("--char-noise: character perturbation is for text models; this is an image model "
                                    "(measure images with --attack)")
            import random

            from duoclass.robust.noise import perturb_chars

            m["char_noise"] = []
            for rate in char_noise:
                rng = random.Random(seed)
                noisy = [perturb_chars(t, rate, rng) for t in inputs]
                r = evaluate_results(predict_items(pre, self.backend, classes, noisy, batch_size, 1, False, names),
                                     labels, classes, k, f"{data} ('{split}' split, --char-noise {rate})")
                m["char_noise"].append({"rate": rate, "seed": seed, "accuracy": r["accuracy"], "f1_macro": r["f1_macro"],
                                        "balanced_accuracy": r["balanced_accuracy"]})
        return m

    # --- explanations -------------------------------------------------------------------------
    def explain(self, inputs: Any, method: str = "auto", target: str | None = None, steps: int = 32,
                batch_size: int = 64) -> Any:
        """Why each input got its label: an Explanations list (one Explanation per input, in order, with
        `attributions`, `label`, `target`, `score`, or its `error`) with `.save(folder)` (PNG overlays, HTML pages,
        explanations.json). method: "auto", "gradcam", "gradcam++", "ig" or "occlusion" (the only one the onnx
        backends have); target: the class to explain (default: each input's predicted label). See infer/explain.py."""
        from duoclass.infer.explain import explain_items

        self._check()
        items, _ = _as_list(inputs)
        return explain_items(self, items, method, target, steps=steps, batch_size=batch_size)

    # --- robustness (image models) ------------------------------------------------------------
    def evaluate_robust(self, data: str | Path, split: str = "test", attack: str = "pgd",
                        eps: str | float | Sequence[str | float] = "8/255", steps: int | None = None,
                        max_examples: int | None = None, batch_size: int = 64, seed: int = 0,
                        path_column: str | None = None, label_column: str | None = None) -> dict[str, Any]:
        """Clean and robust accuracy under one L-inf attack ("fgsm", "pgd" or "autoattack") at each eps
        (e.g. ["2/255", "8/255"]), in [0, 1] pixel space; `steps` is PGD's iterations (default 10) and
        `max_examples` evaluates N examples spread over the split. See robust_eval.py."""
        from duoclass.robust.evaluate import evaluate_robust

        return evaluate_robust(self, data, split, attack, eps, steps, max_examples, batch_size, seed, path_column,
                               label_column)

    def certify(self, data: str | Path, split: str = "test", sigma: float = 0.25, n: int = 1000, n0: int = 100,
                alpha: float = 0.001, batch_size: int = 200, max_examples: int | None = None, seed: int = 0,
                output: str | Path | None = None, path_column: str | None = None,
                label_column: str | None = None) -> dict[str, Any]:
        """Randomized-smoothing certificates (Cohen et al. 2019): per image a prediction or an abstention and a
        certified L2 radius, plus certified accuracy at radius 0, 0.25, 0.5, 0.75, 1. See certify.py."""
        from duoclass.robust.certify import certify

        return certify(self, data, split, sigma, n, n0, alpha, batch_size, max_examples, seed, output=output,
                       path_column=path_column, label_column=label_column)
