"""The small Python API: `train`, `load`, and the `Classifier` they return (classifier.py).

    import duoclass
    clf = duoclass.train("data/xrays", epochs=10, output="runs/xray")
    clf = duoclass.load("runs/xray/model")
    clf.predict(["a.png", "b.png"])         # -> ["normal", "pneumonia"]
    clf.predict_proba(["a.png"])            # -> array of shape (1, n_classes)
    clf.evaluate("data/xrays", split="test")

and the other stages, each the Python form of its command (same settings, same result as the JSON it prints):

    duoclass.export("runs/xray/model")                 # duoclass export: variants/onnx, checked against torch
    duoclass.quantize("runs/xray/model")               # duoclass quantize: int8, kept only if faster and no worse
    duoclass.prune("runs/xray/model", amount=0.3)      # duoclass prune
    duoclass.tune("data/xrays", trials=20, epochs=5)   # duoclass tune: writes runs/tune/best.yaml
    duoclass.pretrain("corpus.txt", output="runs/mlm") # duoclass pretrain
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from duoclass.infer.classifier import Classifier
from duoclass.settings.config import PretrainConfig, TrainConfig
from duoclass.errors import DuoclassError
from duoclass.training.run import resolve, run


log = logging.getLogger("duoclass")


def _settings(cls: type, field: str, given: Any, config: Any, settings: dict[str, Any]) -> Any:
    """`config=` as it is, or a `cls` built from the positional `given` (its `field`) and the keyword settings."""
    if config is None:
        return cls(**{field: str(given) if given is not None else ""}, **settings)
    if given is not None or settings:
        raise TypeError(f"pass either config= or {field} and settings, not both")
    return config


def train(data: str | Path | None = None, config: TrainConfig | None = None, **settings: Any) -> Classifier:
    """Train a classifier and return the best model, loaded. Settings are `TrainConfig` fields."""
    config = _settings(TrainConfig, "data", data, config, settings)
    if not config.data:
        raise DuoclassError("no data given; pass a dataset folder, zip or CSV")
    _log_to_stderr()
    if config.folds or config.seeds:  # repeated runs: the kept model, with the summary in .summary_
        from duoclass.training.repeats import run_repeats

        summary = run_repeats(resolve(config))
        clf = load(summary["kept"]["model_dir"])
        clf.summary_ = summary
        return clf
    result = run(resolve(config))
    if result is None:  # a non-zero rank under torchrun
        return None  # type: ignore[return-value]
    clf = load(result.model_dir)
    clf.result_ = result
    return clf


def load(path: str | Path, device: str = "auto", backend: str = "torch", threads: int | None = None) -> Classifier:
    """Load a model folder. Checks every file's hash; never unpickles anything.

    backend: "torch", "onnx" or "onnx-int8" (the folder's variants from `export` / `quantize`).
    threads: ONNX Runtime's intra-op threads for the onnx backends (default: the DUOCLASS_ONNX_THREADS
    environment variable, else one per core this process may use); the torch backend ignores it."""
    return Classifier.from_folder(path, device=device, backend=backend, threads=threads)


# --- the other stages: `duoclass export / quantize / prune / tune / pretrain` in Python -----------------
def export(model_dir: str | Path, format: str = "onnx", output: str | Path | None = None,
           data: str | Path | None = None, examples: int | None = None) -> dict[str, Any]:
    """`duoclass export`. format="onnx": add the ONNX variant (variants/onnx) to the folder, or to a copy at
    `output`, after checking it against torch on `examples` inputs (default 256) of `data` (default: the
    training data config.json records); returns the variant's record (path, exporter, opset, parity).
    format="transformers": write a transformers folder at `output` (required; text models); returns its check."""
    if format == "transformers":
        from duoclass.compress.transformers import export_transformers

        if not output:
            raise DuoclassError("export(format='transformers'): pass output=DIR, the folder to write")
        return export_transformers(model_dir, output, **({} if examples is None else {"examples": examples}))
    if format != "onnx":
        raise DuoclassError(f"export: format={format!r}; choose onnx or transformers")
    from duoclass.compress.onnx import export_onnx

    return export_onnx(model_dir, output=output, data=data, examples=256 if examples is None else examples)


def quantize(model_dir: str | Path, method: str | None = None, output: str | Path | None = None,
             data: str | Path | None = None, split: str = "test", max_accuracy_drop: float = 0.5, force: bool = False,
             calibration: int = 256, batch_size: int = 32, threads: int | None = None) -> dict[str, Any]:
    """`duoclass quantize`: int8 with ONNX Runtime (method "dynamic" or "static"; default: dynamic for text,
    static for images), measured against fp32 on `split` of `data` and written to variants/onnx-int8 only when
    it is faster and loses at most `max_accuracy_drop` accuracy points (`force=True` writes it anyway).
    Returns the report `duoclass quantize --json` prints."""
    from duoclass.compress.quantize import quantize_model_folder

    return quantize_model_folder(model_dir, method=method, output=output, data=data, split=split,
                                 max_accuracy_drop=max_accuracy_drop, force=force, calibration=calibration,
                                 batch_size=batch_size, threads=threads)


def prune(model_dir: str | Path, amount: float = 0.3, finetune: int = 0, output: str | Path | None = None,
          data: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """`duoclass prune` (msresnet): remove `amount` of every convolution's channels, then fine-tune `finetune`
    epochs on `data` (default: the training data config.json records). Writes to `output` (default
    MODEL_DIR-pruned); returns the report `duoclass prune --json` prints."""
    from duoclass.compress.prune import prune_model_folder

    _log_to_stderr()
    return prune_model_folder(model_dir, amount=amount, output=output, finetune_epochs=finetune, data=data,
                              device=device)


def tune(data: str | Path | None = None, *, trials: int, study_dir: str | Path = "runs/tune",
         timeout: float | None = None, config: TrainConfig | None = None, **settings: Any) -> dict[str, Any]:
    """`duoclass tune` (needs optuna): `trials` more trials of the study in `study_dir`, searching lr,
    batch_size, weight_decay, label_smoothing (and max_length for text). Settings are `TrainConfig` fields;
    those you pass are kept fixed, not searched (with config=, those that differ from the defaults).
    Writes STUDY_DIR/best.yaml and summary.json; returns the summary."""
    from duoclass.training.tune import tune as tune_study

    fixed = set(settings) if config is None else None  # with config=, those that differ from the defaults
    config = _settings(TrainConfig, "data", data, config, settings)
    _log_to_stderr()
    return tune_study(config, trials, study_dir, timeout=timeout, fixed=fixed)


def pretrain(corpus: str | Path | None = None, config: PretrainConfig | None = None, **settings: Any) -> dict[str, Any]:
    """`duoclass pretrain`: masked-language-model pretraining on unlabelled text (a .txt, CSV/TSV/JSONL or a
    text dataset folder). Settings are `PretrainConfig` fields (output, model, epochs, ...); OUTPUT/model is
    the Hugging Face folder to fine-tune with `train(data, model=OUTPUT/model)`. Returns the summary."""
    from duoclass.training.pretrain import pretrain as run_pretrain

    config = _settings(PretrainConfig, "corpus", corpus, config, settings)
    if not config.corpus:
        raise DuoclassError("pretrain: no corpus given; pass a .txt (one text per line) or a CSV/TSV/JSONL file")
    _log_to_stderr()
    return run_pretrain(config)


def _log_to_stderr() -> None:
    """Per-epoch progress for Python users too: an INFO handler on the duoclass logger when nothing is configured."""
    import sys

    logger = logging.getLogger("duoclass")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
