"""Typed settings.

`TrainConfig` holds every training setting, `PretrainConfig` those of `duoclass pretrain`.
The CLI flags are generated from their fields (grouped by each field's `group`) and the
optional `--config FILE.yaml` fills the same fields, so both paths are validated by the
same `__post_init__`: every value is type-checked (numeric strings such as YAML's "1e-3"
become numbers) and range-checked before any data is read, and a bad one is a
`DuoclassError` naming the flag. Each run writes the resolved settings to
`RUN_DIR/config.yaml`.

This module imports neither torch nor the image code, so the CLI can build its parser
(and `--help`) quickly.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from duoclass.errors import DuoclassError
from duoclass.settings.augment import PRESETS
from duoclass.settings.budget import eps_value

log = logging.getLogger("duoclass")

# Titles of the argument groups of `duoclass train --help`, in order; each TrainConfig field names one.
GROUPS: dict[str, str] = {
    "data": "where the examples come from and which columns hold what",
    "image": "image data only: input size and augmentation",
    "text": "text data only: tokenisation and augmentation",
    "model": "architecture, weights and classifier head",
    "optimisation": "loss, optimizer and learning-rate schedule",
    "evaluation": "checkpoint selection and evaluation",
    "robustness": "adversarial training: perturbed pixels for images, perturbed input embeddings for text",
    "run": "output folder, resuming, device and logging",
}

# Settings that older versions wrote to config.yaml and that no longer exist: name -> why.
# Loading such a file (e.g. `--resume` of an old run) drops them with a warning.
REMOVED: dict[str, str] = {"log_every": "nothing read it; the training loss is logged per epoch"}


OPERATING_METRICS = ("sensitivity", "specificity")


def parse_operating_point(text: str) -> tuple[str, float]:
    """("sensitivity" | "specificity", target) from "sensitivity=0.95"; ValueError with the fix otherwise."""
    name, eq, value = str(text).partition("=")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if not eq or name.strip() not in OPERATING_METRICS or not 0 < target < 1:
        raise ValueError(f"got {text!r}; give sensitivity=P or specificity=P with P between 0 and 1, e.g. "
                         "sensitivity=0.95")
    return name.strip(), target


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Settings for one training run (images or text)."""

    # --- data ---------------------------------------------------------------------------
    data: str = _f("", "dataset: ImageFolder tree, .zip of one, CSV manifest, or text CSV/TSV/JSONL", positional=True,
                   group="data")
    task: Literal["auto", "image", "text"] = _f("auto", "what the data holds; 'auto' infers it from the files", group="data")
    valid_fraction: float = _f(0.1, "share of train held out (stratified, seeded) when the data has no valid split",
                               group="data")
    image_size: Optional[int] = _f(
        None, "square input size in pixels; default: 224, or native size for datasets of small images (<= 64 px)",
        group="image", example=224,
    )
    augment: str = _f("default", "augmentation preset: default (rotation, translation, flips, scaling, colour jitter), "
                      "light, flip, all, crop, none", group="image")
    rotation: Optional[float] = _f(None, "max rotation in degrees, 0 to 180 (overrides the preset)", group="image",
                                   example=15)
    translate: Optional[float] = _f(None, "max translation as a fraction of the size, in [0, 1) (overrides the preset)",
                                    group="image", example=0.1)
    scale: Optional[float] = _f(None, "max zoom in/out as a fraction in [0, 1), e.g. 0.1 for 0.9-1.1x (overrides the preset)",
                                group="image", example=0.1)
    hflip: Optional[float] = _f(None, "horizontal flip probability (overrides the preset)", group="image", example=0.5)
    vflip: Optional[float] = _f(None, "vertical flip probability (overrides the preset)", group="image", example=0.5)
    color_jitter: Optional[float] = _f(None, "brightness/contrast/saturation jitter strength in [0, 1] (overrides the preset)",
                                       group="image", example=0.2)
    random_resized_crop: Optional[float] = _f(
        None, "min area kept by a random resized crop, in [0, 1), 0 = off (overrides the preset)", group="image",
        example=0.35,
    )
    noise_augment: Optional[float] = _f(
        None, "Gaussian noise sigma added to training images in [0, 1] pixel space (randomized smoothing needs it; "
        "e.g. 0.25); 0 = off", group="image", example=0.25,
    )
    text_column: str = _f("text", "text task: column holding the text", group="data")
    label_column: str = _f("label", "column holding the label (text CSVs and image manifests)", group="data")
    path_column: str = _f("path", "image CSV manifest: column holding the image path", group="data")
    max_length: int = _f(128, "text task: maximum tokens per example (tfidf-mlp: 8x as many words)", group="text")
    length_buckets: bool = _f(
        True, "text task, transformer models: shuffle, then batch examples of similar length together so batches "
        "carry little padding (--no-length-buckets: plain shuffling; fasttext and tfidf-mlp always shuffle plainly)",
        group="text",
    )
    lowercase: bool = _f(True, "text task: lowercase text for tokenizers trained on the data and for fasttext and "
                               "tfidf-mlp n-grams "
                               "(pretrained tokenizers keep their own setting)", group="text")
    vocab_size: int = _f(8000, "text task: vocabulary size of a tokenizer trained on the data (albert-scratch-*)",
                         group="text")
    text_augment: str = _f(
        "none", "text task: training-text augmentation preset: none, light (delete/swap/synonym 0.05), "
        "default (EDA: delete/insert/swap/synonym 0.1); words, or characters for Chinese", group="text"
    )
    text_delete: Optional[float] = _f(None, "text task: probability of dropping each word/character (overrides the preset)",
                                      group="text", example=0.1)
    text_insert: Optional[float] = _f(
        None, "text task: per word/character, probability of inserting a neighbour of a random one (overrides the preset)",
        group="text", example=0.1,
    )
    text_swap: Optional[float] = _f(None, "text task: probability of swapping each word/character with another (overrides the preset)",
                                    group="text", example=0.1)
    text_synonym: Optional[float] = _f(
        None, "text task: probability of replacing each word/character by a neighbour from --synonyms (overrides the preset)",
        group="text", example=0.1,
    )
    synonyms: Literal["embedding", "wordnet"] = _f(
        "embedding", "text task: neighbours for synonym replacement and insertion: embedding (offline: co-occurrence "
        "PPMI+SVD vectors of the training texts, cosine top-10) or wordnet (needs nltk and its wordnet corpus)",
        group="text",
    )
    back_translate: Optional[str] = _f(
        None, "text task: FORWARD_DIR,BACK_DIR: two local Hugging Face seq2seq folders (e.g. opus-mt en-de and de-en); "
        "training texts are translated there and back once before training (cached)", group="text",
        example="opus-en-de,opus-de-en",
    )
    text_back_translate: Optional[float] = _f(
        None, "text task: probability of training on an example's back-translation instead of the original "
        "(overrides the preset: light 0.3, default 0.5; needs --back-translate)", group="text", example=0.5,
    )

    # --- model --------------------------------------------------------------------------
    model: Optional[str] = _f(
        None, "model name (see `duoclass models`), timm:<name>, hf:<id-or-folder>, or a Hugging Face model folder; "
        "default: msresnet for images, hf:albert-base-v2 for text", group="model", example="msresnet"
    )
    pretrained: Optional[str] = _f(
        None, "pretrained weights: a local .safetensors/.pth file, or 'hub' to use the hub cache; "
        "hf: models default to their own weights", group="model", example="hub",
    )
    dropout: Optional[float] = _f(
        None, "dropout before the classifier; default: the model's recommended value (tfidf-mlp: 0.5, others: 0.1); "
        "config.yaml records the value used", group="model", example=0.1,
    )
    pooling: Literal["cls", "attention"] = _f(
        "cls", "text task: classifier head over the token states: cls (the pooled [CLS] state; mean for fasttext) "
        "or attention (a learned masked-softmax weighted sum of all token states)", group="model"
    )

    # --- optimisation -------------------------------------------------------------------
    epochs: int = _f(12, "number of passes over the training data", group="optimisation")
    max_steps: int = _f(0, "stop after this many optimizer steps; 0 = run all epochs", group="optimisation")
    batch_size: int = _f(64, "examples per step (per process when distributed)", group="optimisation")
    lr: Optional[float] = _f(
        None, "peak learning rate; default: the model's recommended rate (msresnet and timm: 2e-3, albert-scratch and "
        "tfidf-mlp: 1e-3, "
        "fasttext: 1e-2, hf: checkpoints 5e-5, hf: folders from `duoclass pretrain` 5e-4); config.yaml records the value used",
        group="optimisation", example="1e-3",
    )
    weight_decay: float = _f(0.05, "decoupled weight decay (AdamW); L2 for Adam", group="optimisation")
    optimizer: Literal["adamw", "adam"] = _f("adamw", "optimizer", group="optimisation")
    schedule: Literal["cosine", "onecycle", "plateau", "constant", "linear"] = _f(
        "cosine", "learning-rate schedule: warmup+cosine, one-cycle, reduce-on-plateau, constant, "
        "linear (warmup, then linear decay to 0)", group="optimisation"
    )
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs (cosine and linear schedules)", group="optimisation")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing", group="optimisation")
    class_weights: Literal["none", "auto", "balanced", "sqrt"] = _f(
        "auto", "loss weights for imbalanced classes (largest/smallest > 1.5): balanced = inverse frequency, "
        "sqrt = its square root (a milder correction), auto = sqrt, none = off", group="optimisation"
    )
    grad_clip: float = _f(5.0, "clip the gradient norm to this value; 0 = off", group="optimisation")
    ema: float = _f(0.0, "exponential moving average of weights (e.g. 0.999); 0 = off", group="optimisation")
    amp: bool = _f(True, "mixed precision on CUDA (ignored on CPU)", group="optimisation")

    # --- evaluation and selection -------------------------------------------------------
    select_metric: str = _f(
        "balanced_accuracy", "validation metric that picks the best checkpoint (balanced_accuracy, accuracy, f1_macro, "
        "loss, ...); balanced accuracy (mean per-class recall) does not reward matching the valid split's class mix; "
        "on a tie the later epoch wins", group="evaluation"
    )
    early_stopping: int = _f(0, "stop after this many epochs without improvement; 0 = off", group="evaluation")
    top_k: int = _f(5, "k for top-k accuracy", group="evaluation")
    tta: bool = _f(False, "test-time augmentation (average with the horizontally flipped input) at evaluation",
                   group="evaluation")
    calibration: Literal["temperature", "none"] = _f(
        "temperature", "temperature: fit one temperature on the valid split at the end of training (L-BFGS on the "
        "negative log-likelihood; Guo et al. 2017), so predicted probabilities mean what they say; the model folder "
        "records it and every backend applies it. none: raw softmax", group="evaluation")
    conformal: Optional[float] = _f(
        None, "ALPHA: also fit split-conformal prediction sets that hold the true class with probability 1 - ALPHA "
        "(e.g. 0.1); the valid split is halved, one half for the temperature, the other for the sets",
        group="evaluation")
    conformal_score: Literal["aps", "raps"] = _f(
        "aps", "the conformal score: aps (adaptive prediction sets) or raps (regularised: smaller sets with many "
        "classes)", group="evaluation")
    operating_point: Optional[str] = _f(
        None, "two classes: sensitivity=0.95 or specificity=0.95: the decision threshold on the second class's "
        "calibrated probability that reaches this on the valid split; the model folder records it, predict and serve "
        "label by it, and the report gives test sensitivity and specificity at it", group="evaluation")
    conformal_by_class: bool = _f(
        False, "with --conformal: one threshold per class (class-conditional conformal): the coverage holds for "
        "every class, so also when the class mix of the data predicted differs from valid's", group="evaluation")
    folds: int = _f(0, "K-fold cross-validation: train and valid pooled and split into K stratified parts, one run "
                    "per part (OUTPUT/fold-N) validating on it, the test split untouched; then OUTPUT/summary.json "
                    "(0 = one run)", group="evaluation")
    fold: Optional[int] = _f(None, "the part (0..K-1) this run validates on; --folds sets it for each run",
                             group="evaluation")
    seeds: Optional[str] = _f(None, "comma-separated seeds, e.g. 0,1,2: one run per seed (OUTPUT/seed-N), then "
                                    "OUTPUT/summary.json", group="evaluation")
    bootstrap: int = _f(1000, "resamples of the stratified bootstrap behind the 95%% intervals of the final valid and "
                        "test metrics; 0 = no intervals", group="evaluation")
    explain_examples: int = _f(2, "the report's explanations.png: per class up to this many correctly and this many "
                               "wrongly predicted test examples (valid without a test split), explained (method auto; "
                               "at most 16 in all); 0 = none", group="evaluation")

    # --- robustness (attacks.py) ---------------------------------------------------------
    adversarial: Literal["none", "fgsm", "pgd", "trades", "fgm"] = _f(
        "none", "adversarial training: fgsm (images: FGSM from a random start, step 1.25 eps; Wong et al. 2020), "
        "pgd (images: PGD-k, Madry et al. 2018; text: k steps on the input embeddings), trades (images: "
        "Zhang et al. 2019), fgm (text: one step on the input embeddings, Miyato et al. 2017), none = off",
        group="robustness",
    )
    eps: str = _f(
        "8/255", "attack budget: images: L-inf radius in [0, 1] pixel space, a number or a fraction (8/255, 0.03); "
        "text: L2 norm of the perturbation of the embedding table, and left at 8/255 it means 1.0",
        group="robustness",
    )
    adv_steps: int = _f(7, "attack steps of --adversarial pgd and trades (>= 1; fgsm and fgm take one)",
                        group="robustness")
    adv_ratio: float = _f(1.0, "share of each batch trained on adversarial examples, the rest clean; in (0, 1]",
                          group="robustness")
    eps_warmup: float = _f(0.0, "epochs over which eps ramps up linearly from 0; 0 = the full eps from the first step",
                           group="robustness")
    trades_beta: float = _f(6.0, "--adversarial trades: weight of the KL term (higher: more robust, less accurate)",
                            group="robustness")

    # --- run ----------------------------------------------------------------------------
    output: str = _f("runs/train", "run folder; the best model lands in OUTPUT/model/", group="run")
    resume: Optional[str] = _f(None, "continue an interrupted run from its folder", group="run", example="runs/train")
    overwrite: bool = _f(False, "replace an earlier run in --output (model, metrics, TensorBoard logs); without it such "
                                "an --output is refused", group="run")
    seed: int = _f(0, "random seed", group="run")
    deterministic: bool = _f(False, "deterministic algorithms and data order (bit-exact resume on CPU)", group="run")
    device: Literal["auto", "cpu", "cuda", "mps"] = _f("auto", "where to train", group="run")
    workers: int = _f(-1, "data-loading worker processes; -1 = automatic", group="run")
    tensorboard: bool = _f(True, "write TensorBoard logs when tensorboard is installed", group="run")
    progress: bool = _f(True, "show a progress bar", group="run")

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise DuoclassError(f"--{name.replace('_', '-')}: {msg}")

        check_types(self)  # every field has its declared type from here on
        if self.epochs < 1:
            bad("epochs", f"got {self.epochs}; the number of epochs must be a positive integer, e.g. --epochs 10")
        if self.max_steps < 0:
            bad("max_steps", f"got {self.max_steps}; must be >= 0 (0 = run all epochs)")
        if self.batch_size < 1:
            bad("batch_size", f"got {self.batch_size}; use a positive batch size, e.g. --batch-size 64")
        if self.lr is not None and not self.lr > 0:
            bad("lr", f"got {self.lr}; the learning rate must be > 0, e.g. --lr 1e-3")
        if self.lr is not None and self.lr > 1:
            log.warning("--lr %g: far above any usual rate (Adam: 1e-5 to 1e-2); training will likely diverge", self.lr)
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
        # augmentation strengths: (low, high, high included?, what the value is)
        for name, hi, closed, what in (
            ("rotation", 180, True, "max degrees in [0, 180], e.g. 15"),
            ("translate", 1, False, "a fraction of the size in [0, 1), e.g. 0.1"),
            ("scale", 1, False, "a zoom range in [0, 1), e.g. 0.1 for 0.9-1.1x"),
            ("color_jitter", 1, True, "a strength in [0, 1], e.g. 0.2"),
            ("random_resized_crop", 1, False, "the min area kept, in [0, 1), e.g. 0.35, or 0 for off"),
            ("hflip", 1, True, "a probability in [0, 1]"),
            ("vflip", 1, True, "a probability in [0, 1]"),
            ("noise_augment", 1, True, "a noise sigma in [0, 1] pixel units, e.g. 0.25 (0 = off)"),
        ):
            v = getattr(self, name)
            if v is not None and not (0 <= v <= hi if closed else 0 <= v < hi):
                bad(name, f"got {v}; must be {what}")
        for name in ("text_delete", "text_insert", "text_swap", "text_synonym", "text_back_translate"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                bad(name, f"got {v}; a probability must be in [0, 1]")
        from duoclass.report.metrics import selectable_metrics

        metrics = selectable_metrics(self.top_k)
        if self.select_metric not in metrics:
            close = difflib.get_close_matches(self.select_metric, metrics, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            bad("select_metric", f"unknown metric {self.select_metric!r}; {hint}choose one of: {', '.join(metrics)}")
        from duoclass.settings.augment import TEXT_PRESETS, parse_back_translate

        if self.text_augment not in TEXT_PRESETS:
            bad("text_augment", f"unknown preset {self.text_augment!r}; choose one of: {', '.join(TEXT_PRESETS)}")
        if self.back_translate is not None:
            parse_back_translate(self.back_translate)
        elif self.text_back_translate:
            bad("text_back_translate", "needs the translation models: add --back-translate FORWARD_DIR,BACK_DIR")
        if self.augment not in PRESETS:
            bad("augment", f"unknown preset {self.augment!r}; choose one of: {', '.join(PRESETS)}")
        self._check_robustness()
        self._check_evaluation(bad)

    def _check_evaluation(self, bad: Any) -> None:
        """Calibration, conformal sets, intervals, cross-validation and repeats."""
        if self.conformal is not None and not 0 < self.conformal < 1:
            bad("conformal", f"got {self.conformal}; ALPHA is the miss rate allowed, between 0 and 1, e.g. 0.1")
        if self.operating_point is not None:
            try:
                parse_operating_point(self.operating_point)
            except ValueError as e:
                bad("operating_point", str(e))
        if self.explain_examples < 0:
            bad("explain_examples", f"got {self.explain_examples}; examples per class must be >= 0 (0: no explanations.png)")
        if self.bootstrap < 0:
            bad("bootstrap", f"got {self.bootstrap}; the number of resamples must be >= 0 (e.g. 1000, or 0 for none)")
        if self.folds == 1 or self.folds < 0:
            bad("folds", f"got {self.folds}; cross-validation needs K >= 2 parts (e.g. 5), or 0 for one run")
        if self.fold is not None and not (self.folds >= 2 and 0 <= self.fold < self.folds):
            bad("fold", f"got {self.fold}; a fold is 0..K-1 of --folds K (>= 2); --folds sets it, leave it out")
        if self.seeds is not None:
            try:
                seeds = [int(x) for x in self.seeds.split(",") if x.strip()]
            except ValueError:
                seeds = []
            if not seeds or len(set(seeds)) != len(seeds):
                bad("seeds", f"got {self.seeds!r}; give distinct whole numbers separated by commas, e.g. 0,1,2")
            if self.folds:
                bad("seeds", "and --folds: choose one (repeats over seeds, or K-fold cross-validation)")

    def _check_robustness(self) -> None:
        """The adversarial-training settings. What needs the task (fgsm is for images, fgm for text; eps <= 1 for
        images) is checked by attacks.check_adversarial once the task is known, before any data is read."""
        def bad(name: str, msg: str) -> None:
            raise DuoclassError(f"--{name.replace('_', '-')}: {msg}")

        if self.adv_steps < 1:
            bad("adv_steps", f"got {self.adv_steps}; an attack needs at least one step, e.g. --adv-steps 7")
        if not 0 < self.adv_ratio <= 1:
            bad("adv_ratio", f"got {self.adv_ratio}; a share in (0, 1], e.g. 0.5 for half of each batch adversarial")
        if self.eps_warmup < 0:
            bad("eps_warmup", f"got {self.eps_warmup}; epochs must be >= 0 (0 = no ramp)")
        if self.trades_beta < 0:
            bad("trades_beta", f"got {self.trades_beta}; must be >= 0, e.g. --trades-beta 6")
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.metadata.get("group") == "robustness"}
        changed = [n for n in defaults if n != "adversarial" and getattr(self, n) != defaults[n]]
        if self.adversarial == "none":
            if changed:
                bad(changed[0], "applies only to adversarial training; add --adversarial fgsm, pgd, trades or fgm, "
                    f"or drop --{changed[0].replace('_', '-')}")
            return
        if "trades_beta" in changed and self.adversarial != "trades":
            bad("trades_beta", f"applies only to --adversarial trades, not {self.adversarial}; drop --trades-beta")
        if "adv_steps" in changed and self.adversarial in ("fgsm", "fgm"):
            bad("adv_steps", f"--adversarial {self.adversarial} takes a single step; use --adversarial pgd for "
                "a multi-step attack, or drop --adv-steps")

        eps_value(self.eps, self.task)

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from duoclass.artifacts.atomic import atomic_write_text

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
        for name in sorted(set(values) & set(REMOVED) - known):
            log.warning("%s: setting %r no longer exists (%s); ignored", p, name, REMOVED[name])
            del values[name]
        unknown = sorted(set(values) - known)
        if unknown:
            raise DuoclassError(f"{p}: unknown setting(s) {', '.join(unknown)}; see `duoclass train --help` for the names")
        values.update(overrides)
        return cls(**values)


@functools.lru_cache(maxsize=None)
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


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def convert(name: str, value: Any, cls: type | None = None) -> Any:
    """`value` as the declared type of field `name` of a settings dataclass (TrainConfig by default).

    Numbers may come as strings (YAML reads `1e-3` as text; the CLI converts each flag's text
    here too, so both give the same message), ints are fine where a float is expected, a whole float where an int is, and a path where
    text is. Anything else (a string where a bool is expected, "abc" for --lr, a bool for
    --epochs) is a DuoclassError that names the flag and gives an example.
    """
    cls = cls or TrainConfig
    base, optional, choices = field_type(name, cls)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    flag = name.upper() if f.metadata.get("positional") else "--" + name.replace("_", "-")
    if value is None and optional:
        return None
    if choices:
        if value in choices:
            return value
        raise DuoclassError(f"{flag}: got {value!r}; choose one of: {', '.join(map(str, choices))}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise DuoclassError(f"{flag}: got {value!r}; expected true or false (on the command line: {flag} or "
                            f"--no-{flag[2:]})")
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif base is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
    elif base is float and not isinstance(value, bool):
        number = _number(value)
        if number is not None:
            return number
    example = f.metadata.get("example", f.default if f.default not in (None, "", dataclasses.MISSING) else None)
    eg = f", e.g. {flag} {example}" if example is not None else ""
    raise DuoclassError(f"{flag}: got {value!r}; expected {_EXPECTED.get(base, base.__name__)}{eg}")


def _number(value: Any) -> float | None:
    """A finite float from an int, float or numeric string; None otherwise."""
    if not isinstance(value, (int, float, str)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def check_types(obj: Any) -> None:
    """Convert every field of a settings dataclass instance to its declared type, or raise (see `convert`)."""
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, convert(f.name, getattr(obj, f.name), type(obj)))


@dataclass
class PretrainConfig:
    """Settings for masked-language-model pretraining."""

    corpus: str = _f("", "unlabelled text: a .txt file (one text per line), a CSV/TSV/JSONL, or a text dataset folder",
                     positional=True)
    output: str = _f("runs/pretrain", "folder to write (Hugging Face format: config.json, model.safetensors, tokenizer)")
    model: str = _f("albert-scratch-tiny", "albert-scratch-tiny|small to start from scratch, or an HF folder / hf:<id> to continue")
    text_column: str = _f("text", "column holding the text (CSV/TSV/JSONL corpora)")
    epochs: int = _f(1, "passes over the corpus")
    max_steps: int = _f(0, "stop after this many optimizer steps; 0 = run all epochs")
    batch_size: int = _f(32, "texts per step")
    lr: float = _f(5e-4, "peak learning rate (linear warmup, then linear decay)")
    weight_decay: float = _f(0.01, "decoupled weight decay (AdamW)")
    warmup: float = _f(0.06, "warmup length as a fraction of all steps")
    max_length: int = _f(128, "maximum tokens per text")
    mlm_probability: float = _f(0.15, "share of tokens to predict")
    vocab_size: int = _f(8000, "vocabulary size of the tokenizer trained from scratch")
    lowercase: bool = _f(True, "lowercase text for the tokenizer trained from scratch")
    seed: int = _f(0, "random seed")
    device: str = _f("auto", "where to train: auto, cpu, cuda, mps")
    valid_fraction: float = _f(0.05, "share of the corpus (at most 1,000 texts) held out to measure the masked-LM loss "
                                     "every epoch; the folder keeps the epoch with the lowest")
    resume: Optional[str] = _f(None, "continue an interrupted pretraining run from its --output folder")
    amp: bool = _f(True, "mixed precision on CUDA (ignored on CPU)")
    tensorboard: bool = _f(True, "write TensorBoard logs when tensorboard is installed")
    progress: bool = _f(True, "show a progress bar (only when stderr is a terminal)")

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise DuoclassError(f"--{name.replace('_', '-')}: {msg}")

        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, f"got {getattr(self, name)}; must be a positive integer")
        if self.max_steps < 0:
            bad("max_steps", f"got {self.max_steps}; must be >= 0 (0 = all epochs)")
        if not 0 <= self.valid_fraction < 1:
            bad("valid_fraction", f"got {self.valid_fraction}; a share in [0, 1), e.g. 0.05")
        if not self.lr > 0:
            bad("lr", f"got {self.lr}; the learning rate must be > 0, e.g. --lr 5e-4")
        if self.weight_decay < 0:
            bad("weight_decay", f"got {self.weight_decay}; must be >= 0")
        if not 0 <= self.warmup < 1:
            bad("warmup", f"got {self.warmup}; a fraction in [0, 1), e.g. 0.06")
        if not 8 <= self.max_length <= 512:
            bad("max_length", f"got {self.max_length}; use 8 to 512")
        if not 0 < self.mlm_probability < 1:
            bad("mlm_probability", f"got {self.mlm_probability}; use a share in (0, 1), e.g. 0.15")
        if self.vocab_size < 100:
            bad("vocab_size", f"got {self.vocab_size}; use at least 100")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            bad("device", f"got {self.device!r}; choose one of: auto, cpu, cuda, mps")
