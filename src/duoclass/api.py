"""The small Python API: `train`, `load`, and the `Classifier` they return.

    import duoclass
    clf = duoclass.train("data/xrays", epochs=10, output="runs/xray")
    clf = duoclass.load("runs/xray/model")
    clf.predict(["a.png", "b.png"])         # -> ["normal", "pneumonia"]
    clf.predict_proba(["a.png"])            # -> array of shape (1, n_classes)
    clf.evaluate("data/xrays", split="test")
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import read_model_folder
from .config import TrainConfig
from .data.splits import TaskData
from .errors import DuoclassError, NotFittedError

log = logging.getLogger("duoclass")


def infer_task(cfg: TrainConfig) -> str:
    """'image' or 'text' from the setting, the model name, or the files."""
    from .models import model_task

    if cfg.task != "auto":
        return cfg.task
    by_model = model_task(cfg.model)
    if by_model is not None and not cfg.model.startswith("msresnet"):  # msresnet is also the untouched default
        return by_model
    p = Path(cfg.data)
    if p.is_dir():
        names = {q.name.lower() for q in p.iterdir()}
        if any(n.endswith((".csv", ".tsv", ".jsonl")) and n.split(".")[0] in ("train", "valid", "test", "dev", "val") for n in names):
            return "text"
        return "image"
    if p.suffix.lower() == ".jsonl":
        return "text"
    if p.suffix.lower() in (".csv", ".tsv") and p.is_file():
        from .data.tables import read_table

        header, _ = read_table(p)
        if cfg.text_column in header and cfg.path_column not in header:
            return "text"
    return "image"


TEXT_DEFAULT_MODEL = "hf:albert-base-v2"


def resolve_settings(cfg: TrainConfig) -> TrainConfig:
    """Fill the task-dependent defaults; the result is what the run records in config.yaml.

    A Hugging Face folder as --model means hf:FOLDER; text data with the image default model
    (msresnet) gets hf:albert-base-v2; hf: models start from their own weights; an unset
    learning rate and dropout become the model's recommended ones (models.default_lr, default_dropout).
    """
    from .models import default_dropout, default_lr, model_task
    from .models.text_models import is_hf_folder

    if not cfg.model.startswith(("hf:", "timm:")) and is_hf_folder(cfg.model):
        cfg = dataclasses.replace(cfg, model=f"hf:{cfg.model}")
    task = infer_task(cfg)
    model, pretrained = cfg.model, cfg.pretrained
    if task == "text" and model == "msresnet":
        model = TEXT_DEFAULT_MODEL
    by_model = model_task(model)
    if by_model is not None and by_model != task:
        raise DuoclassError(f"--model {model}: a {by_model} model, but {cfg.data} holds {task} data; "
                            f"pick a {task} model from `duoclass models`")
    if model.startswith("hf:") and pretrained is None:
        pretrained = model[len("hf:"):]
    lr = cfg.lr if cfg.lr is not None else default_lr(model)
    dropout = cfg.dropout if cfg.dropout is not None else default_dropout(model)
    return dataclasses.replace(cfg, task=task, model=model, pretrained=pretrained, lr=lr, dropout=dropout)


def prepare(cfg: TrainConfig) -> TaskData:
    """Turn the settings' data into datasets for the engine (pass settings through resolve_settings first)."""
    task = infer_task(cfg)
    if task == "image":
        from .image import prepare_images
        from .text_augment import CONFIG_FIELDS

        if cfg.text_augment != "none" or cfg.back_translate or any(getattr(cfg, f) for f in CONFIG_FIELDS.values()):
            log.warning("text augmentation settings (--text-augment, --text-*, --back-translate) do not apply to images; ignored")

        return prepare_images(cfg)
    from .text import prepare_text

    return prepare_text(cfg)


def train(data: str | Path | None = None, config: TrainConfig | None = None, **settings: Any) -> "Classifier":
    """Train a classifier and return the best model, loaded. Settings are `TrainConfig` fields."""
    from .engine import fit

    if config is None:
        config = TrainConfig(data=str(data) if data is not None else "", **settings)
    elif data is not None or settings:
        raise TypeError("pass either config= or data and settings, not both")
    if not config.data:
        raise DuoclassError("no data given; pass a dataset folder, zip or CSV")
    config = resolve_settings(config)
    _check_early(config)
    result = fit(config, prepare(config))
    if result is None:  # a non-zero rank under torchrun
        return None  # type: ignore[return-value]
    clf = load(result.model_dir)
    clf.result_ = result
    return clf


def _check_early(cfg: TrainConfig) -> None:
    """Fail on a wrong image-model name, resume folder or head before any data is read or file written."""
    from .models import get_spec, unknown_model_error

    if cfg.resume and not (Path(cfg.resume) / "state.pt").is_file():
        raise DuoclassError(
            f"{Path(cfg.resume) / 'state.pt'}: no training state to resume from; pass the --output folder of an earlier run"
        )
    if cfg.task == "image" and not cfg.model.startswith("timm:") and get_spec(cfg.model) is None:
        raise unknown_model_error(cfg.model)
    if cfg.task == "text":
        from .models.text_models import check_head

        check_head(cfg.model, cfg.pooling)


def load(path: str | Path, device: str = "auto") -> "Classifier":
    """Load a model folder. Checks every file's hash; never unpickles anything."""
    return Classifier.from_folder(path, device=device)


class Classifier:
    """A trained model plus its preprocessing and class names."""

    def __init__(self, model: nn.Module, classes: list[str], preprocessor: Any, config: dict[str, Any], device: torch.device):
        self.model = model
        self.classes_ = list(classes)
        self.preprocessor = preprocessor
        self.config_ = config
        self.device = device
        self.result_: Any = None

    @classmethod
    def from_folder(cls, path: str | Path, device: str = "auto") -> "Classifier":
        from .engine import pick_device
        from .models import create_model

        folder = Path(path)
        cfg, state = read_model_folder(folder)
        task = cfg["task"]
        if task == "image":
            from .image import ImagePreprocessor

            pre = ImagePreprocessor.from_config(cfg["preprocessing"], folder)
        elif task == "text":
            from .text import TextPreprocessor

            pre = TextPreprocessor.from_config(cfg["preprocessing"], folder)
        else:
            raise DuoclassError(f"{folder}: task {task!r} is not supported by this version of duoclass; upgrade it")
        dev = pick_device(device)
        model = create_model(cfg["model"]["name"], len(cfg["classes"]), **cfg["model"].get("args", {}))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise DuoclassError(f"{folder / 'model.safetensors'}: weights do not fit the architecture in config.json ({first})") from None
        model.to(dev).eval()
        return cls(model, cfg["classes"], pre, cfg, dev)

    # --- prediction -----------------------------------------------------------------------
    def _batches(self, inputs: Sequence[Any], batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i : i + batch_size]
            yield self.preprocessor.collate([self.preprocessor.load(x) for x in chunk])

    def predict_proba(self, inputs: Sequence[Any] | Any, batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape (N, n_classes), columns in `classes_` order."""
        from .engine import predict_probs

        if self.model is None:
            raise NotFittedError("this classifier has no weights; use duoclass.load(MODEL_DIR) or duoclass.train(...)")
        if isinstance(inputs, (str, Path, bytes)) or not isinstance(inputs, Sequence):
            inputs = [inputs]
        if len(inputs) == 0:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return predict_probs(self.model, self._batches(list(inputs), batch_size), self.device)

    def predict(self, inputs: Sequence[Any] | Any, batch_size: int = 64) -> list[str]:
        """Predicted class names, one per input."""
        probs = self.predict_proba(inputs, batch_size)
        return [self.classes_[i] for i in probs.argmax(axis=1)]

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, data: str | Path, split: str = "test", batch_size: int = 64, top_k: int = 5) -> dict[str, Any]:
        """Metrics on a labelled split of a dataset (the same layouts `train` reads)."""
        from .data.sources import read_image_dataset
        from .data.splits import label_ids
        from .engine import evaluate as run_eval

        if self.config_["task"] == "text":
            return self._evaluate_text(data, split, batch_size, top_k)
        ds = read_image_dataset(data)
        if split not in ds.splits:
            raise DuoclassError(f"{data}: no '{split}' split (found: {', '.join(sorted(ds.splits))}); pass --split NAME")
        items = ds.splits[split]
        labels = label_ids([y for _, y in items], self.classes_, f"{data} ({split} split)")
        skipped = 0

        def batches() -> Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]:
            nonlocal skipped
            for i in range(0, len(items), batch_size):
                xs, ys = [], []
                for (ref, _), y in zip(items[i : i + batch_size], labels[i : i + batch_size]):
                    try:
                        xs.append(self.preprocessor.load(ref))
                        ys.append(y)
                    except DuoclassError as e:
                        skipped += 1
                        log.warning("skipped %s", e)
                if xs:
                    yield self.preprocessor.collate(xs), torch.tensor(ys)
            if skipped == len(items):
                why = f"none of its {skipped} images could be read (see the warnings above)" if skipped else "it has no images"
                raise DuoclassError(f"{data}: nothing to evaluate in the '{split}' split: {why}; fix the files or pass another --split")

        m = run_eval(self.model, batches(), self.device, self.classes_, top_k=top_k, loss_fn=nn.CrossEntropyLoss())
        m["skipped_files"] = skipped
        return m

    def _evaluate_text(self, data: str | Path, split: str, batch_size: int, top_k: int) -> dict[str, Any]:
        from .data.splits import label_ids
        from .engine import evaluate as run_eval
        from .text import read_eval_split

        pre = self.preprocessor
        recs, skipped, where = read_eval_split(data, split, pre.text_column, pre.label_column)
        labels = label_ids([r.label for r in recs], self.classes_, f"{where} ({split} split)")  # type: ignore[misc]
        encoded = pre.encode([r.text for r in recs])

        def batches() -> Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]:
            for i in range(0, len(recs), batch_size):
                yield pre.collate(encoded[i : i + batch_size]), torch.tensor(labels[i : i + batch_size])

        m = run_eval(self.model, batches(), self.device, self.classes_, top_k=top_k, loss_fn=nn.CrossEntropyLoss())
        m["skipped_files"] = skipped  # rows with empty text
        return m
