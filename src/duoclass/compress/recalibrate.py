"""`duoclass calibrate MODEL_DIR [DATA]`: fit a model folder's temperature (and conformal sets) again, for the
weights or for one of its variants, on labelled held-out data: new data from where the model is used, or the
valid split after `quantize` or `prune` changed the logits.

    report = calibrate_model_folder("runs/xray/model", "data/xrays", split="valid", backend="onnx-int8")

The folder records the result in place (or in a copy at `output`): for the weights in config.json's
"calibration" (and "conformal"), for a variant in that variant's record; the report gives the calibration
figures before and after, and the ECE the variant would have had with the temperature it had before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from duoclass.errors import DuoclassError


def logit_views(clf: Any, data: str | Path, split: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """The classifier's logits (V, N, C) on a labelled split, its labels, and how many inputs could not be read."""
    from duoclass.infer.predict import predict_views
    from duoclass.preprocess.load import load_each

    inputs, _, labels, _, _ = clf.split_inputs(data, split)
    encoded, errors = load_each(clf.preprocessor, inputs)
    order = sorted(encoded, key=lambda i: len(encoded[i])) if clf.task == "text" else sorted(encoded)
    batches = [clf.preprocessor.collate([encoded[i] for i in order[j:j + batch_size]])
               for j in range(0, len(order), batch_size)]
    views = predict_views(clf.backend, batches, clf.tta)
    return views, np.asarray([labels[i] for i in order], dtype=np.int64), len(errors)


def calibrate_model_folder(model_dir: str | Path, data: str | Path | None = None, split: str = "valid",
                           backend: str = "torch", conformal: float | None = None, score: str = "aps",
                           seed: int | None = None, output: str | Path | None = None,
                           batch_size: int = 64, device: str = "auto",
                           previous_temperature: float | None = None, by_class: bool = False) -> dict[str, Any]:
    """Refit the temperature of `backend`'s logits (the weights for "torch", else that variant) on `split` of
    `data` (default: the data config.json records); with `conformal` ALPHA, also the conformal sets (the split
    is then halved, as in training). Writes the folder (or `output`) and returns the report. `previous_temperature`:
    the one to compare with when the folder's own is not it (a pruned copy: its source's)."""
    from duoclass.artifacts.folder import read_model_config, recorded_training, update_model_folder
    from duoclass.calibrate.fit import fit_calibration
    from duoclass.calibrate.temperature import calibrated
    from duoclass.compress.onnx import training_data
    from duoclass.infer.classifier import Classifier, temperature_of
    from duoclass.report.metrics import calibration_metrics

    folder = Path(model_dir)
    cfg = read_model_config(folder)
    src = training_data(cfg, data, folder, flag="DATA")
    seed = recorded_training(cfg)["seed"] if seed is None else seed
    clf = Classifier.from_folder(folder, backend=backend, device=device)
    views, y, unreadable = logit_views(clf, src, split, batch_size)
    if len(y) < 2:
        raise DuoclassError(f"{src}: the {split} split has {len(y)} usable examples; calibration needs labelled "
                            "held-out examples (pass --split NAME or another DATA)")
    variant = cfg.get("variants", {}).get(backend) if backend != "torch" else None
    old_t = temperature_of(cfg, variant) if previous_temperature is None else previous_temperature
    cal, cp = fit_calibration(views, y, "temperature", conformal, score, seed, where=f"{src} ({split})",
                              by_class=by_class)
    cal["previous_temperature"] = old_t
    cal["ece_with_previous_temperature"] = calibration_metrics(y, calibrated(views, old_t))["ece"]
    if backend == "torch":
        settings: dict[str, Any] = {"calibration": cal}
        if conformal is not None:
            settings["conformal"] = cp
        target = update_model_folder(folder, settings=settings, output=output)
    else:
        if conformal is not None:
            raise DuoclassError(f"--conformal with --backend {backend}: the conformal sets are the folder's, fitted "
                                "on the weights' logits; refit them without --backend")
        target = update_model_folder(folder, variants={backend: {**variant, "calibration": cal}}, output=output)  # type: ignore[dict-item]
    return {"model_dir": str(target), "backend": backend, "data": str(src), "split": split, "examples": int(len(y)),
            "unreadable": unreadable, "calibration": cal, "conformal": cp}


def refit_variant(folder: Path, backend: str, data: str | Path | None) -> dict[str, Any] | None:
    """After quantize (or an export that changes the logits): the variant's own temperature, refit on the valid
    split of the training data; None, with the reason logged, when that split is not at hand."""
    import logging

    from duoclass.artifacts.folder import read_model_config

    log = logging.getLogger("duoclass")
    cfg = read_model_config(folder)
    if cfg.get("calibration", {}).get("method", "none") == "none":
        return None  # an uncalibrated folder stays so
    try:
        return calibrate_model_folder(folder, data, "valid", backend=backend)["calibration"]
    except DuoclassError as e:
        log.warning("%s: the %s variant keeps the weights' temperature (%.3f), not refit: %s", folder, backend,
                    cfg["calibration"]["temperature"], e)
        return None
