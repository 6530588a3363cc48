"""Augmentation presets and their parsers, for images (`Augment`, `--augment`) and text (`TextAugment`,
`--text-augment`, `--back-translate`), plus `--char-noise` rates. Plain settings: no torch, no models.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")


@dataclass(frozen=True)
class TextAugment:
    """Augmentation rates, each in [0, 1]; 0 switches an operation off."""

    delete: float = 0.0
    insert: float = 0.0
    swap: float = 0.0
    synonym: float = 0.0
    back_translate: float = 0.0  # used only when back-translation models are given


TEXT_PRESETS: dict[str, TextAugment] = {
    "none": TextAugment(),
    # Small edits that rarely change the meaning.
    "light": TextAugment(delete=0.05, swap=0.05, synonym=0.05, back_translate=0.3),
    # EDA's recommended rate (alpha = 0.1) for every operation (Wei & Zou, 2019).
    "default": TextAugment(delete=0.1, insert=0.1, swap=0.1, synonym=0.1, back_translate=0.5),
}
CONFIG_FIELDS = {name: f"text_{name}" for name in TextAugment.__dataclass_fields__}  # TrainConfig names


def resolve_text_augment(cfg: Any) -> TextAugment:
    """The preset named by cfg.text_augment, with the per-operation settings that are set overriding it."""
    aug = TEXT_PRESETS[cfg.text_augment]
    over = {k: getattr(cfg, f) for k, f in CONFIG_FIELDS.items() if getattr(cfg, f, None) is not None}
    aug = replace(aug, **over)
    if not getattr(cfg, "back_translate", None):
        aug = replace(aug, back_translate=0.0)  # the preset's rate needs models to act on
    return aug


# --- back-translation -------------------------------------------------------------------------
def parse_back_translate(value: str) -> tuple[str, str]:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise DuoclassError(f"--back-translate: got {value!r}; pass two Hugging Face seq2seq folders as FORWARD_DIR,BACK_DIR")
    return parts[0], parts[1]


def parse_rates(text: str, flag: str = "--char-noise") -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1]; each a rate in [0, 1]."""
    try:
        rates = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise DuoclassError(f"{flag}: got {text!r}; give rates in [0, 1], comma-separated, e.g. {flag} 0.05,0.1") from None
    if not rates or any(not 0 <= r <= 1 for r in rates):
        raise DuoclassError(f"{flag}: got {text!r}; give rates in [0, 1], comma-separated, e.g. {flag} 0.05,0.1")
    return rates


# --- image augmentation presets -------------------------------------------------------------
def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


# --- image augmentation presets (used by image.py) ------------------------------------------
@dataclass(frozen=True)
class Augment:
    """Random augmentation sizes. 0 switches an augmentation off."""

    rotation: float = 0.0  # max degrees
    translate: float = 0.0  # fraction of the size
    scale: float = 0.0  # zoom range: 1 +- scale
    hflip: float = 0.0  # probability
    vflip: float = 0.0  # probability
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    random_resized_crop: float = 0.0  # min kept area; 0 = off
    noise: float = 0.0  # Gaussian noise sigma in [0, 1] pixel space (randomized smoothing); 0 = off


PRESETS: dict[str, Augment] = {
    # The founding document's list: rotation, translation, flips, scaling, colour jitter.
    "default": Augment(rotation=15, translate=0.1, scale=0.1, hflip=0.5, vflip=0.0, color_jitter=0.2),
    "light": Augment(translate=0.1, hflip=0.5),
    "flip": Augment(hflip=0.5),
    # For data without an up (microscopy, aerial, ...).
    "all": Augment(rotation=30, translate=0.1, scale=0.15, hflip=0.5, vflip=0.5, color_jitter=0.2),
    "crop": Augment(random_resized_crop=0.35, hflip=0.5, color_jitter=0.2),
    "none": Augment(),
}


def resolve_augment(cfg: Any) -> Augment:
    aug = PRESETS[cfg.augment]
    over = {k: getattr(cfg, k) for k in aug.__dataclass_fields__ if getattr(cfg, k, None) is not None}
    if getattr(cfg, "noise_augment", None) is not None:
        over["noise"] = cfg.noise_augment
    return replace(aug, **over)
