"""What every model shares: the spec a registered name carries, the registry it goes into, and the image
model base (normalisation inside the model, inputs in [0, 1]). Model modules import this, never the lookups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
# What a model takes as input, i.e. which preprocessor turns raw inputs into its tensors.
INPUT_KINDS: dict[str, str] = {
    "image": "images in [0, 1], (B, 3, S, S) pixel_values",
    "ngram-hash": "hashed word and char n-gram ids (fasttext); nothing is learned from the data",
    "ngram-vocab": "ids of an n-gram vocabulary built from the training texts, with TF-IDF weights (tfidf-mlp)",
    "trained-tokenizer": "token ids of a WordPiece (or character) tokenizer trained on the training texts",
    "hf-tokenizer": "token ids of a Hugging Face checkpoint's own tokenizer (hf:<id-or-folder>)",
}
HF_HEADS = ("cls", "attention")  # every hf:<id-or-folder> model


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str  # "image" or "text"
    builder: Callable[..., nn.Module]
    description: str
    defaults: dict[str, Any]
    lr: float = 2e-3  # recommended peak learning rate (AdamW), the --lr default for this model
    dropout: float = 0.1  # the --dropout default for this model
    input: str = "image"  # a key of INPUT_KINDS
    heads: tuple[str, ...] = ()  # the --pooling choices it supports; () where --pooling does not apply (images)


_REGISTRY: dict[str, ModelSpec] = {}
ALIASES: dict[str, str] = {}


def register(name: str, task: str, description: str, *, lr: float = 2e-3, dropout: float = 0.1,
             input: str | None = None, heads: tuple[str, ...] | None = None, **defaults: Any) -> Callable:
    """Decorator: register a model builder under a user-facing name. Duplicate names are an error.

    `lr` is the model's recommended peak learning rate (used when --lr is not given), `dropout`
    its recommended dropout before the classifier (used when --dropout is not given);
    `input` the kind of input it takes (a key of INPUT_KINDS; image models default to "image",
    text models must say), `heads` the --pooling choices it has (text default: ("cls",));
    `defaults` are keyword arguments passed to the builder.
    """
    kind = input if input is not None else ("image" if task == "image" else None)
    if kind not in INPUT_KINDS:
        raise ValueError(f"model {name!r}: input must be one of {', '.join(INPUT_KINDS)}, got {input!r}")
    heads = tuple(heads) if heads is not None else (() if task == "image" else ("cls",))

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY or name in ALIASES:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, task, fn, description, defaults, lr, dropout, kind, heads)
        return fn

    return deco


def alias(short: str, target: str) -> None:
    if short in _REGISTRY or short in ALIASES:
        raise ValueError(f"model name {short!r} is registered twice")
    ALIASES[short] = target


class Normalize(nn.Module):
    """(x - mean) / std with the constants saved in the weights, so inputs stay in [0, 1]."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageModel(nn.Module):
    """Wraps an image backbone: dict in, normalisation inside, logits out."""

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(self.normalize(batch["pixel_values"]))
