"""Typed settings.

`TrainConfig` holds every training setting. The CLI flags of `duoclass train` are
generated from its fields and the optional `--config FILE.yaml` fills the same
fields, so both paths are validated by the same `__post_init__`. Each run writes
the resolved settings to `RUN_DIR/config.yaml`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import DuoclassError


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Settings for one training run (images or text)."""

    # --- data ---------------------------------------------------------------------------
    data: str = _f("", "dataset: ImageFolder tree, .zip of one, CSV manifest, or text CSV/TSV/JSONL", positional=True)
    task: Literal["auto", "image", "text"] = _f("auto", "what the data holds; 'auto' infers it from the files")
    valid_fraction: float = _f(0.1, "share of train held out (stratified, seeded) when the data has no valid split")
    image_size: Optional[int] = _f(
        None, "square input size in pixels; default: 224, or native size for datasets of small images (<= 64 px)"
    )
    augment: str = _f("default", "augmentation preset: default (rotation, translation, flips, scaling, colour jitter), light, flip, none")
    rotation: Optional[float] = _f(None, "max rotation in degrees (overrides the preset)")
    translate: Optional[float] = _f(None, "max translation as a fraction of the size (overrides the preset)")
    scale: Optional[float] = _f(None, "max zoom in/out as a fraction, e.g. 0.1 for 0.9-1.1x (overrides the preset)")
    hflip: Optional[float] = _f(None, "horizontal flip probability (overrides the preset)")
    vflip: Optional[float] = _f(None, "vertical flip probability (overrides the preset)")
    color_jitter: Optional[float] = _f(None, "brightness/contrast/saturation jitter strength (overrides the preset)")
    random_resized_crop: Optional[float] = _f(None, "min area kept by a random resized crop, 0 = off (overrides the preset)")
    text_column: str = _f("text", "text task: column holding the text")
    label_column: str = _f("label", "column holding the label (text CSVs and image manifests)")
    path_column: str = _f("path", "image CSV manifest: column holding the image path")
    max_length: int = _f(128, "text task: maximum tokens per example (tfidf-mlp: 8x as many words)")
    length_buckets: bool = _f(
        True, "text task, transformer models: shuffle, then batch examples of similar length together so batches "
        "carry little padding (--no-length-buckets: plain shuffling; fasttext and tfidf-mlp always shuffle plainly)"
    )
    lowercase: bool = _f(True, "text task: lowercase text for tokenizers trained on the data and for fasttext and "
                               "tfidf-mlp n-grams "
                               "(pretrained tokenizers keep their own setting)")
    vocab_size: int = _f(8000, "text task: vocabulary size of a tokenizer trained on the data (albert-scratch-*)")
    text_augment: str = _f(
        "none", "text task: training-text augmentation preset: none, light (delete/swap/synonym 0.05), "
        "default (EDA: delete/insert/swap/synonym 0.1); words, or characters for Chinese"
    )
    text_delete: Optional[float] = _f(None, "text task: probability of dropping each word/character (overrides the preset)")
    text_insert: Optional[float] = _f(
        None, "text task: per word/character, probability of inserting a neighbour of a random one (overrides the preset)"
    )
    text_swap: Optional[float] = _f(None, "text task: probability of swapping each word/character with another (overrides the preset)")
    text_synonym: Optional[float] = _f(
        None, "text task: probability of replacing each word/character by a neighbour from --synonyms (overrides the preset)"
    )
    synonyms: Literal["embedding", "wordnet"] = _f(
        "embedding", "text task: neighbours for synonym replacement and insertion: embedding (offline: co-occurrence "
        "PPMI+SVD vectors of the training texts, cosine top-10) or wordnet (needs nltk and its wordnet corpus)"
    )
    back_translate: Optional[str] = _f(
        None, "text task: FORWARD_DIR,BACK_DIR: two local Hugging Face seq2seq folders (e.g. opus-mt en-de and de-en); "
        "training texts are translated there and back once before training (cached)"
    )
    text_back_translate: Optional[float] = _f(
        None, "text task: probability of training on an example's back-translation instead of the original "
        "(overrides the preset: light 0.3, default 0.5; needs --back-translate)"
    )

    # --- model --------------------------------------------------------------------------
    model: str = _f(
        "msresnet", "model name (see `duoclass models`), timm:<name>, hf:<id-or-folder>, or a Hugging Face model folder; "
        "text data defaults to hf:albert-base-v2"
    )
    pretrained: Optional[str] = _f(
        None, "pretrained weights: a local .safetensors/.pth file, or 'hub' to use the hub cache; "
        "hf: models default to their own weights"
    )
    dropout: Optional[float] = _f(
        None, "dropout before the classifier; default: the model's recommended value (tfidf-mlp: 0.5, others: 0.1); "
        "config.yaml records the value used"
    )
    pooling: Literal["cls", "attention"] = _f(
        "cls", "text task: classifier head over the token states: cls (the pooled [CLS] state; mean for fasttext) "
        "or attention (a learned masked-softmax weighted sum of all token states)"
    )

    # --- optimisation -------------------------------------------------------------------
    epochs: int = _f(12, "number of passes over the training data")
    batch_size: int = _f(64, "examples per step (per process when distributed)")
    lr: Optional[float] = _f(
        None, "peak learning rate; default: the model's recommended rate (msresnet and timm: 2e-3, albert-scratch and "
        "tfidf-mlp: 1e-3, "
        "fasttext: 1e-2, hf: checkpoints 5e-5, hf: folders from `duoclass pretrain` 5e-4); config.yaml records the value used"
    )
    weight_decay: float = _f(0.05, "decoupled weight decay (AdamW); L2 for Adam")
    optimizer: Literal["adamw", "adam"] = _f("adamw", "optimizer")
    schedule: Literal["cosine", "onecycle", "plateau", "constant"] = _f(
        "cosine", "learning-rate schedule: warmup+cosine, one-cycle, reduce-on-plateau, constant"
    )
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs (cosine schedule)")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing")
    class_weights: Literal["none", "auto", "balanced", "sqrt"] = _f(
        "auto", "loss weights for imbalanced classes (largest/smallest > 1.5): balanced = inverse frequency, "
        "sqrt = its square root (a milder correction), auto = sqrt, none = off"
    )
    grad_clip: float = _f(5.0, "clip the gradient norm to this value; 0 = off")
    ema: float = _f(0.0, "exponential moving average of weights (e.g. 0.999); 0 = off")
    amp: bool = _f(True, "mixed precision on CUDA (ignored on CPU)")

    # --- evaluation and selection -------------------------------------------------------
    select_metric: str = _f(
        "balanced_accuracy", "validation metric that picks the best checkpoint (balanced_accuracy, accuracy, f1_macro, "
        "loss, ...); balanced accuracy (mean per-class recall) does not reward matching the valid split's class mix; "
        "on a tie the later epoch wins"
    )
    early_stopping: int = _f(0, "stop after this many epochs without improvement; 0 = off")
    top_k: int = _f(5, "k for top-k accuracy")
    tta: bool = _f(False, "test-time augmentation (average with the horizontally flipped input) at evaluation")

    # --- run ----------------------------------------------------------------------------
    output: str = _f("runs/train", "run folder; the best model lands in OUTPUT/model/")
    resume: Optional[str] = _f(None, "continue an interrupted run from its folder")
    seed: int = _f(0, "random seed")
    deterministic: bool = _f(False, "deterministic algorithms and data order (bit-exact resume on CPU)")
    device: Literal["auto", "cpu", "cuda", "mps"] = _f("auto", "where to train")
    workers: int = _f(-1, "data-loading worker processes; -1 = automatic")
    log_every: int = _f(0, "also log the training loss every N steps; 0 = only per epoch")
    tensorboard: bool = _f(True, "write TensorBoard logs when tensorboard is installed")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise DuoclassError(f"--{name.replace('_', '-')}: {msg}")

        if self.epochs < 1:
            bad("epochs", f"got {self.epochs}; the number of epochs must be a positive integer, e.g. --epochs 10")
        if self.batch_size < 1:
            bad("batch_size", f"got {self.batch_size}; use a positive batch size, e.g. --batch-size 64")
        if self.lr is not None and not self.lr > 0:
            bad("lr", f"got {self.lr}; the learning rate must be > 0, e.g. --lr 1e-3")
        if self.weight_decay < 0:
            bad("weight_decay", f"got {self.weight_decay}; must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", f"got {self.label_smoothing}; must be in [0, 1)")
        if not 0 < self.valid_fraction < 1:
            bad("valid_fraction", f"got {self.valid_fraction}; must be between 0 and 1, e.g. 0.1")
        if self.image_size is not None and not 8 <= self.image_size <= 2048:
            bad("image_size", f"got {self.image_size}; use a size between 8 and 2048 pixels, e.g. 224")
        if not 0 <= self.ema < 1:
            bad("ema", f"got {self.ema}; use a decay in [0, 1), e.g. 0.999, or 0 to switch it off")
        if self.grad_clip < 0:
            bad("grad_clip", f"got {self.grad_clip}; must be >= 0")
        if self.early_stopping < 0:
            bad("early_stopping", f"got {self.early_stopping}; must be >= 0")
        if self.warmup_epochs < 0:
            bad("warmup_epochs", f"got {self.warmup_epochs}; must be >= 0")
        if self.top_k < 1:
            bad("top_k", f"got {self.top_k}; must be >= 1")
        if self.max_length < 8:
            bad("max_length", f"got {self.max_length}; must be >= 8")
        if self.vocab_size < 100:
            bad("vocab_size", f"got {self.vocab_size}; use at least 100, e.g. --vocab-size 8000")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            bad("dropout", f"got {self.dropout}; must be in [0, 1)")
        for name in ("hflip", "vflip"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                bad(name, f"got {v}; a probability must be in [0, 1]")
        for name in ("text_delete", "text_insert", "text_swap", "text_synonym", "text_back_translate"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                bad(name, f"got {v}; a probability must be in [0, 1]")
        from .text_augment import TEXT_PRESETS, parse_back_translate

        if self.text_augment not in TEXT_PRESETS:
            bad("text_augment", f"unknown preset {self.text_augment!r}; choose one of: {', '.join(TEXT_PRESETS)}")
        if self.back_translate is not None:
            parse_back_translate(self.back_translate)
        elif self.text_back_translate:
            bad("text_back_translate", "needs the translation models: add --back-translate FORWARD_DIR,BACK_DIR")
        from .image import PRESETS

        if self.augment not in PRESETS:
            bad("augment", f"unknown preset {self.augment!r}; choose one of: {', '.join(PRESETS)}")
        for name in ("task", "optimizer", "schedule", "class_weights", "device", "pooling", "synonyms"):
            choices = typing.get_args(_hints()[name])
            if getattr(self, name) not in choices:
                bad(name, f"got {getattr(self, name)!r}; choose one of: {', '.join(choices)}")

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise DuoclassError(f"{p}: config file not found; pass an existing YAML file to --config")
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DuoclassError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the file or drop --config") from None
        if not isinstance(values, dict):
            raise DuoclassError(f"{p}: expected a mapping of setting: value at the top level")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DuoclassError(f"{p}: unknown setting(s) {', '.join(unknown)}; see `duoclass train --help` for the names")
        values.update(overrides)
        return cls(**values)


def _hints(cls: type | None = None) -> dict[str, Any]:
    return typing.get_type_hints(cls or TrainConfig)


def field_type(name: str, cls: type | None = None) -> tuple[type, bool, tuple]:
    """(base type, optional?, choices) of a settings dataclass field (TrainConfig by default), for the CLI generator."""
    t = _hints(cls)[name]
    optional = False
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = True
        t = args[0]
        origin = typing.get_origin(t)
    if origin is Literal:
        choices = typing.get_args(t)
        return type(choices[0]), optional, choices
    return t, optional, ()
