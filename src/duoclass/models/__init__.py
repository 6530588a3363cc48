"""Model registry: the names a user can type.

Every model takes a dict of tensors and returns logits of shape (batch, num_classes):
images pass `{"pixel_values": float tensor in [0, 1], shape (B, 3, H, W)}`; text passes
token ids. Normalisation lives inside image models so attacks, export and serving all
work in [0, 1] input space.

    create_model("msresnet-small", num_classes=2, image_size=28)
    create_model("timm:resnet18", num_classes=10, image_size=224)
    create_model("fasttext", num_classes=4)
    create_model("hf:path/to/folder", num_classes=2, pretrained="path/to/folder")

Each entry says what input its model takes (`input_kind`: how raw inputs become tensors)
and which classifier heads it has (`heads`, the --pooling choices). Builders take explicit
keyword arguments; `create_model` refuses one a builder does not take, naming the ones it does.

May import: duoclass.errors, duoclass.preprocess.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

import torch
from torch import nn

from duoclass.errors import DuoclassError


from duoclass.models.base import ALIASES, HF_HEADS, _REGISTRY, ModelSpec


def _load_builtin() -> None:
    from duoclass.models import msresnet  # noqa: F401  (registers msresnet-*)
    from duoclass.models import text_models  # noqa: F401  (registers albert-scratch-*, fasttext, tfidf-mlp)


def resolve_name(name: str) -> str:
    _load_builtin()
    return ALIASES.get(name, name)


def get_spec(name: str) -> ModelSpec | None:
    return _REGISTRY.get(resolve_name(name))


def available(task: str | None = None) -> list[ModelSpec]:
    _load_builtin()
    return [s for s in _REGISTRY.values() if task is None or s.task == task]


def input_kind(name: str) -> str:
    """What model `name` takes as input: a key of INPUT_KINDS. timm:<x> is "image", hf:<x> "hf-tokenizer"."""
    if name.startswith("timm:"):
        return "image"
    if name.startswith("hf:"):
        return "hf-tokenizer"
    spec = get_spec(name)
    if spec is None:
        raise unknown_model_error(name)
    return spec.input


def model_heads(name: str) -> tuple[str, ...]:
    """The --pooling choices of model `name`; () where --pooling does not apply (image models)."""
    if name.startswith("timm:"):
        return ()
    if name.startswith("hf:"):
        return HF_HEADS
    spec = get_spec(name)
    if spec is None:
        raise unknown_model_error(name)
    return spec.heads


def check_head(name: str, pooling: str) -> None:
    """Refuse a --pooling the model does not have (tfidf-mlp has no token states to pool)."""
    heads = model_heads(name)
    if heads and pooling not in heads:
        raise DuoclassError(f"--pooling {pooling}: {name} has no {pooling!r} head (it has: {', '.join(heads)}); "
                            f"use --pooling {heads[0]}")


def model_task(name: str) -> str | None:
    """'image', 'text', or None when the name is unknown."""
    if name.startswith("timm:"):
        return "image"
    if name.startswith("hf:"):
        return "text"
    spec = get_spec(name)
    return spec.task if spec else None


HF_FINETUNE_LR = 5e-5  # the usual rate for fine-tuning a pretrained transformer
HF_SMALL_LR = 5e-4  # small ALBERTs pretrained here (`duoclass pretrain`, the folder has pretrain.json)
TIMM_LR = 2e-3


def default_lr(name: str) -> float:
    """The recommended peak learning rate of a model name: what an unset --lr becomes."""
    if name.startswith("timm:"):
        return TIMM_LR
    if name.startswith("hf:"):
        from pathlib import Path

        return HF_SMALL_LR if (Path(name[len("hf:"):]) / "pretrain.json").is_file() else HF_FINETUNE_LR
    spec = get_spec(name)
    if spec is None:
        raise unknown_model_error(name)
    return spec.lr


def default_dropout(name: str) -> float:
    """The recommended dropout before the classifier: what an unset --dropout becomes (0.1 for timm: and hf: models)."""
    spec = None if name.startswith(("timm:", "hf:")) else get_spec(name)
    return spec.dropout if spec is not None else 0.1


def unknown_model_error(name: str) -> DuoclassError:
    names = [s.name for s in available()] + list(ALIASES)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return DuoclassError(
        f"unknown model {name!r}; {hint}run `duoclass models` for the list, or use timm:<name> for any timm image model "
        "or hf:<id-or-folder> for any Hugging Face text model"
    )


def check_args(name: str, builder: Callable[..., Any], args: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Refuse a keyword argument `builder` does not take (a builder with **kwargs takes any)."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if k not in ("num_classes", *skip)
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for k in args:
        if k not in accepted:
            hint = f"; {name} has no pretrained weights to load: drop --pretrained" if k == "pretrained" else ""
            raise DuoclassError(f"model {name}: unknown argument {k!r} (accepted: {', '.join(accepted)}){hint}")


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a model by registered name (or `timm:<name>`, `hf:<id-or-folder>`) with `num_classes` outputs.

    Keyword arguments go to the builder; one it does not take is a DuoclassError.
    """
    if num_classes < 2:
        raise DuoclassError(f"a classifier needs at least 2 classes, got {num_classes}")
    if name.startswith("timm:"):
        from duoclass.models.timm_adapter import create_timm_model

        check_args(name, create_timm_model, kwargs, skip=("name",))
        return create_timm_model(name[len("timm:"):], num_classes=num_classes, **kwargs)
    if name.startswith("hf:"):
        from duoclass.models.text_models import create_hf_model

        check_args(name, create_hf_model, kwargs, skip=("source",))
        if "pooling" in kwargs:
            check_head(name, kwargs["pooling"])
        return create_hf_model(name[len("hf:"):], num_classes=num_classes, **kwargs)
    spec = get_spec(name)
    if spec is None:
        raise unknown_model_error(name)
    args = {**spec.defaults, **kwargs}
    check_args(spec.name, spec.builder, args)
    if "pooling" in args:
        check_head(spec.name, args["pooling"])
    return spec.builder(num_classes=num_classes, **args)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int = 224) -> int:
    """Forward FLOPs for one 3 x S x S image (a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = {"pixel_values": torch.rand(1, 3, image_size, image_size)}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())
