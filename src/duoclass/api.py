"""The small Python API: `train`, `load`, and the `Classifier` they return (classifier.py).

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
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .classifier import Classifier
from .config import TrainConfig
from .errors import DuoclassError

if TYPE_CHECKING:
    from .data.splits import TaskData

log = logging.getLogger("duoclass")


def infer_task(cfg: TrainConfig) -> str:
    """'image' or 'text' from the setting, the model name, or the files."""
    from .data.text_files import holds_text
    from .models import get_spec, input_kind

    if cfg.task != "auto":
        return cfg.task
    known = get_spec(cfg.model) is not None or cfg.model.startswith(("timm:", "hf:"))
    if known and input_kind(cfg.model) != "image":  # a text model; an image model on text data is caught later
        return "text"
    return "text" if holds_text(cfg.data, cfg.text_column, cfg.path_column) else "image"


TEXT_DEFAULT_MODEL = "hf:albert-base-v2"


def resolve_settings(cfg: TrainConfig) -> TrainConfig:
    """Fill the task-dependent defaults; the result is what the run records in config.yaml.

    A Hugging Face folder as --model means hf:FOLDER; text data with the image default model
    (msresnet) gets hf:albert-base-v2; hf: models start from their own weights; an unset
    learning rate and dropout become the model's recommended ones (models.default_lr, default_dropout).
    """
    from .models import default_dropout, default_lr, model_task
    from .models.text_models import is_hf_folder

    run_model = Path(cfg.model) / "model"  # the run folder of `duoclass pretrain` holds its HF folder in model/
    if not cfg.model.startswith(("hf:", "timm:")) and (run_model / "pretrain.json").is_file():
        cfg = dataclasses.replace(cfg, model=str(run_model))
    if not cfg.model.startswith(("hf:", "timm:")) and is_hf_folder(cfg.model):
        cfg = dataclasses.replace(cfg, model=f"hf:{cfg.model}")
    task = infer_task(cfg)
    model, pretrained = cfg.model, cfg.pretrained
    if task == "text" and model == TrainConfig.model:  # the untouched default is an image model
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


def prepare(cfg: TrainConfig, given: dict[str, Any] | None = None) -> "TaskData":
    """Turn the settings' data into datasets for the engine (pass settings through resolve_settings first).

    given: text only, another process's preprocessing to use instead of building one (see
    distributed.prepare_once): {"preprocessing": to_config(), "files": {name: bytes}, "model_args": ...}.
    """
    task = infer_task(cfg)
    if task == "image":
        from .image import prepare_images
        from .text_augment import CONFIG_FIELDS

        if cfg.text_augment != "none" or cfg.back_translate or any(getattr(cfg, f) for f in CONFIG_FIELDS.values()):
            log.warning("text augmentation settings (--text-augment, --text-*, --back-translate) do not apply to images; ignored")

        return prepare_images(cfg)
    from .text import prepare_text

    return prepare_text(cfg, given=given)


def train(data: str | Path | None = None, config: TrainConfig | None = None, **settings: Any) -> Classifier:
    """Train a classifier and return the best model, loaded. Settings are `TrainConfig` fields."""
    from .distributed import prepare_once
    from .engine import fit

    if config is None:
        config = TrainConfig(data=str(data) if data is not None else "", **settings)
    elif data is not None or settings:
        raise TypeError("pass either config= or data and settings, not both")
    if not config.data:
        raise DuoclassError("no data given; pass a dataset folder, zip or CSV")
    _log_to_stderr()
    config = resolve_settings(config)
    _check_early(config)
    from .attacks import make_step

    task_data = prepare_once(config, prepare)  # under torchrun: rank 0's vocabulary and classes everywhere
    result = fit(config, task_data, step=make_step(config, task_data))  # --adversarial: an AdversarialStep, else the standard step
    if result is None:  # a non-zero rank under torchrun
        return None  # type: ignore[return-value]
    clf = load(result.model_dir)
    clf.result_ = result
    return clf


def _check_early(cfg: TrainConfig) -> None:
    """Fail on a wrong image-model name, resume folder or head before any data is read or file written."""
    from .models import check_args, get_spec, input_kind

    if cfg.resume and not (Path(cfg.resume) / "state.pt").is_file():
        raise DuoclassError(
            f"{Path(cfg.resume) / 'state.pt'}: no training state to resume from; pass the --output folder of an earlier run"
        )
    input_kind(cfg.model)  # an unknown model name fails here, before any data is read
    spec = get_spec(cfg.model)
    if cfg.pretrained and spec is not None:
        check_args(spec.name, spec.builder, {"pretrained": cfg.pretrained})  # a model without pretrained weights
    if cfg.model.startswith("timm:") and cfg.pretrained == "hub":
        from .models.timm_adapter import check_hub_weights

        check_hub_weights(cfg.model[len("timm:"):])  # offline without cached weights: fail now, not after retries
    if cfg.task == "text":
        from .models.text_models import check_head

        check_head(cfg.model, cfg.pooling)
    from .attacks import check_adversarial

    check_adversarial(cfg)  # --adversarial against the task (fgsm: images, fgm: text) and --eps <= 1 for images


def load(path: str | Path, device: str = "auto", backend: str = "torch") -> Classifier:
    """Load a model folder. Checks every file's hash; never unpickles anything."""
    return Classifier.from_folder(path, device=device, backend=backend)


def _log_to_stderr() -> None:
    """Per-epoch progress for Python users too: an INFO handler on the duoclass logger when nothing is configured."""
    import sys

    logger = logging.getLogger("duoclass")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
