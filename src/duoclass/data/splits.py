"""Label maps and seeded, stratified splits; the bundle of data one training run needs."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from duoclass.errors import DuoclassError

# The one list of split names a folder or file may use: train, valid and test, with their common aliases.
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
                 "dev": "valid", "test": "test", "testing": "test"}


def class_order(labels: Any) -> list[str]:
    """The class names in output order: sorted, as numbers when every name is a whole number (1, 2, 10, not
    1, 10, 2), else as text."""
    names = sorted(set(labels))
    if names and all(re.fullmatch(r"[-+]?\d+", n.strip()) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return names


def split_name(name: str) -> str | None:
    """'train', 'valid' or 'test' for a folder or file stem (case-insensitive), else None."""
    return SPLIT_ALIASES.get(name.lower())


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (keep, held_out): `fraction` of every class (at least one when it has 2+), seeded."""
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    keep, held = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n = len(idx)
        k = max(1, round(n * fraction)) if n >= 2 else 0
        held += idx[:k]
        keep += idx[k:]
    return sorted(keep), sorted(held)


def fold_split(labels: list[str], folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, valid) of fold `fold` of a stratified K-fold split: every class is shuffled (seeded) and dealt
    round-robin into `folds` parts, so each part holds about 1/K of every class; part `fold` is the valid split."""
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    train, valid = [], []
    offset = 0
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            (valid if (j + offset) % folds == fold else train).append(i)
        offset += len(idx)  # the next class starts where this one stopped, so the parts' sizes differ by at most one
    return sorted(train), sorted(valid)


def apply_fold(cfg: Any, train: list[Any], valid: list[Any], label_of: Callable[[Any], str], what: str,
               notes: list[str]) -> tuple[list[Any], list[Any]]:
    """(train, valid) of the run's fold (`cfg.fold` of `cfg.folds`, seeded by `cfg.seed`): train and valid pooled,
    split by fold_split; the note for the run's log is appended to `notes`."""
    pooled = list(train) + list(valid)
    t_idx, v_idx = fold_split([label_of(x) for x in pooled], cfg.folds, cfg.fold, cfg.seed)
    notes.append(f"fold {cfg.fold + 1} of {cfg.folds}: {len(v_idx)} of the {len(pooled)} train and valid {what} "
                 f"validate (stratified, seed {cfg.seed})")
    return [pooled[i] for i in t_idx], [pooled[i] for i in v_idx]


def label_ids(labels: list[str], classes: list[str], where: str) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for y in labels:
        if y not in index:
            raise DuoclassError(
                f"{where}: label {y!r} never appears in the training data (known: {', '.join(classes[:10])}"
                f"{', ...' if len(classes) > 10 else ''}); fix the label or add training examples for it"
            )
        out.append(index[y])
    return out


@dataclass
class TaskData:
    """Everything the engine needs from a task: datasets, batches, classes, preprocessing; and, for a task
    other than classification (pretraining), how to evaluate, save and finish.

    batches: where training batches come from (engine.BatchSource: `len(...)` and `epoch(i)`); None means a
    DataLoader over `train` with `collate`. A GPU-resident source replaces it without touching the loop.
    evaluate(model, split_name) -> metrics, save(folder, model, metrics), finish(...) -> RunResult: None means
    the engine's classification versions (metrics of engine.evaluate_dataset, a duoclass model folder).
    """

    task: str
    classes: list[str]
    train: Any  # a torch Dataset of (inputs, label) pairs
    valid: Any
    test: Any | None
    collate: Callable[[list[Any]], Any]
    preprocessor: Any  # preprocess.ImagePreprocessor or TextPreprocessor: to_config(), inputs(), load(), collate()
    model_args: dict[str, Any]
    train_labels: list[int]
    skipped: list[Any] = field(default_factory=list)  # Finding-like records of skipped inputs
    notes: list[str] = field(default_factory=list)
    extra_files: dict[str, bytes] = field(default_factory=dict)  # e.g. tokenizer files for the model folder
    augment: Callable[[dict], dict] | None = None  # batch-level training augmentation, applied on the device
    batches: Any = None  # engine.BatchSource
    model_name: str | None = None  # the registry name, when it is not the settings' --model
    evaluate: Callable[..., Any] | None = None
    save: Callable[..., Any] | None = None
    finish: Callable[..., Any] | None = None


class SkipCounter:
    """Collate wrapper that drops examples a dataset returned as None, and counts them."""

    def __init__(self, collate: Callable[[list[Any]], Any]):
        self.collate = collate
        self.dropped = 0

    def __call__(self, items: list[Any]) -> Any:
        kept = [it for it in items if it is not None]
        self.dropped += len(items) - len(kept)
        return self.collate(kept) if kept else None
