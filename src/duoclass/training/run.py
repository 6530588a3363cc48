"""The one wiring of a training run: settings resolved (task, model, defaults) and checked, data prepared,
the training step the settings choose, then `fit`.

    cfg = resolve(TrainConfig(data="data/xrays", adversarial="fgsm"))   # defaults filled, bad settings refused
    result = run(cfg)                                                    # prepare_once -> make_step -> fit

`duoclass.train`, `tune` (each trial), `prune` (fine-tuning) and `pretrain` all call `run`, so a step chosen
by the settings (`--adversarial`) cannot be dropped by one entry point: `run` builds it, and an entry point
can only wrap it (prune records its plan) or, for a run the settings' steps do not apply to (masked-LM
pretraining), bring its own step, which `run` refuses together with `--adversarial`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from duoclass.settings.config import TrainConfig
from duoclass.errors import DuoclassError

if TYPE_CHECKING:
    from torch import nn

    from duoclass.data.splits import TaskData
    from duoclass.training.loop import RunResult
    from duoclass.training.steps import Step

log = logging.getLogger("duoclass")


def infer_task(cfg: TrainConfig) -> str:
    """'image' or 'text' from the setting, the model name, or the files."""
    from duoclass.data.text_files import holds_text
    from duoclass.models import get_spec, input_kind

    if cfg.task != "auto":
        return cfg.task
    known = cfg.model is not None and (get_spec(cfg.model) is not None or cfg.model.startswith(("timm:", "hf:")))
    by_model = ("image" if input_kind(cfg.model) == "image" else "text") if known else None
    if not Path(cfg.data).exists():
        return by_model or "image"  # the reader says the data is missing, with its fix
    by_data = "text" if holds_text(cfg.data, cfg.text_column, cfg.path_column) else "image"
    if by_model is not None and by_model != by_data:
        raise DuoclassError(f"--model {cfg.model}: {'an' if by_model == 'image' else 'a'} {by_model} model, but "
                            f"{cfg.data} holds {by_data} data; pick {'an' if by_data == 'image' else 'a'} {by_data} "
                            "model from `duoclass models` (or leave --model out for the default)")
    return by_data


TEXT_DEFAULT_MODEL = "hf:albert-base-v2"
IMAGE_DEFAULT_MODEL = "msresnet"


def resolve_settings(cfg: TrainConfig) -> TrainConfig:
    """Fill the task-dependent defaults; the result is what the run records in config.yaml.

    A Hugging Face folder as --model means hf:FOLDER; text data with the image default model
    (msresnet) gets hf:albert-base-v2; hf: models start from their own weights; an unset
    learning rate and dropout become the model's recommended ones (models.default_lr, default_dropout).
    """
    from duoclass.models import default_dropout, default_lr, model_task
    from duoclass.models.text_models import is_hf_folder

    if cfg.model is not None:
        run_model = Path(cfg.model) / "model"  # the run folder of `duoclass pretrain` holds its HF folder in model/
        if not cfg.model.startswith(("hf:", "timm:")) and (run_model / "pretrain.json").is_file():
            cfg = dataclasses.replace(cfg, model=str(run_model))
        if not cfg.model.startswith(("hf:", "timm:")) and is_hf_folder(cfg.model):
            cfg = dataclasses.replace(cfg, model=f"hf:{cfg.model}")
    task = infer_task(cfg)
    model, pretrained = cfg.model, cfg.pretrained
    if model is None:  # the default follows the data
        model = TEXT_DEFAULT_MODEL if task == "text" else IMAGE_DEFAULT_MODEL
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
        from duoclass.training.image_data import prepare_images
        from duoclass.settings.augment import CONFIG_FIELDS

        if cfg.text_augment != "none" or cfg.back_translate or any(getattr(cfg, f) for f in CONFIG_FIELDS.values()):
            log.warning("text augmentation settings (--text-augment, --text-*, --back-translate) do not apply to images; ignored")

        return prepare_images(cfg)
    from duoclass.training.text_data import prepare_text

    return prepare_text(cfg, given=given)


def _check_early(cfg: TrainConfig) -> None:
    """Fail on a wrong image-model name, resume folder or head before any data is read or file written."""
    from duoclass.models import check_args, get_spec, input_kind

    if cfg.resume and not (Path(cfg.resume) / "state.pt").is_file():
        raise DuoclassError(
            f"{Path(cfg.resume) / 'state.pt'}: no training state to resume from; pass the --output folder of an earlier run"
        )
    out = Path(cfg.output)
    if not cfg.resume and not cfg.overwrite and any((out / f).exists() for f in ("config.yaml", "metrics.json", "model")):
        raise DuoclassError(f"{out}: holds an earlier run; pass --overwrite to replace it, --resume {out} to continue it, "
                            "or another --output")
    input_kind(cfg.model)  # an unknown model name fails here, before any data is read
    spec = get_spec(cfg.model)
    if cfg.pretrained and spec is not None:
        check_args(spec.name, spec.builder, {"pretrained": cfg.pretrained})  # a model without pretrained weights
    if cfg.model.startswith("timm:") and cfg.pretrained == "hub":
        from duoclass.models.timm_adapter import check_hub_weights

        check_hub_weights(cfg.model[len("timm:"):])  # offline without cached weights: fail now, not after retries
    if cfg.task == "text":
        from duoclass.models import check_head

        check_head(cfg.model, cfg.pooling)
    elif cfg.pooling != "cls":  # "cls", the default, is what every saved config.yaml holds: only another choice is an error
        raise DuoclassError(f"--pooling {cfg.pooling}: only text models have a pooling head, and {cfg.model} is an "
                            "image model; drop --pooling")
    from duoclass.training.adversarial import check_adversarial

    check_adversarial(cfg)  # --adversarial against the task (fgsm: images, fgm: text) and --eps <= 1 for images


def resolve(cfg: TrainConfig) -> TrainConfig:
    """The settings a run uses: task-dependent defaults filled (resolve_settings), then checked before any
    data is read or file written (_check_early)."""
    cfg = resolve_settings(cfg)
    _check_early(cfg)
    return cfg


def run(cfg: TrainConfig, *, data: "TaskData | None" = None, model: "nn.Module | None" = None,
        step: "Step | None" = None, wrap_step: "Callable[[Step | None], Step] | None" = None,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> "RunResult | None":
    """Prepare the data (unless given), build the step the settings choose, and fit. `cfg` comes from `resolve`.

    data: already prepared data (tune reuses it across trials; pretrain builds its own); model: an already
    built model (prune, pretrain); step: the step of a run the settings' steps do not apply to (pretrain's
    masked-LM step), refused together with --adversarial; wrap_step: wraps the settings' step (None means
    the standard step) to add to it. Returns fit's RunResult (None on a non-zero rank under torchrun).
    """
    from duoclass.training.adversarial import make_step
    from duoclass.training.distributed import prepare_once
    from duoclass.training.loop import fit

    if data is None:
        data = prepare_once(cfg, prepare)  # under torchrun: rank 0's vocabulary and classes everywhere
    if cfg.operating_point and len(data.classes) != 2:
        raise DuoclassError(f"--operating-point {cfg.operating_point}: a decision threshold is for two classes; "
                            f"{cfg.data} has {len(data.classes)}; leave it out (or use --abstain-below when predicting)")
    chosen = make_step(cfg, data)  # --adversarial: an AdversarialStep; None: the standard step
    if step is not None and chosen is not None:
        raise DuoclassError(f"--adversarial {cfg.adversarial}: this run trains with a step of its own "
                            f"({getattr(step, '__name__', type(step).__name__)}); leave --adversarial out")
    step = step if step is not None else chosen
    if wrap_step is not None:
        step = wrap_step(step)
    return fit(cfg, data, model=model, step=step, on_epoch=on_epoch)
