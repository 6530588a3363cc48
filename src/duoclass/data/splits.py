"""Label maps and seeded, stratified splits; the bundle of data one training run needs."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from torch.utils.data import Dataset as TorchDataset

from ..errors import DuoclassError


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
    """Everything the engine needs from a modality: datasets, collate, classes, preprocessing."""

    task: str
    classes: list[str]
    train: TorchDataset
    valid: TorchDataset
    test: TorchDataset | None
    collate: Callable[[list[Any]], Any]
    preprocessor: Any  # ImagePreprocessor or TextPreprocessor: has to_config() and load()/collate()
    model_args: dict[str, Any]
    train_labels: list[int]
    skipped: list[Any] = field(default_factory=list)  # Finding-like records of skipped inputs
    notes: list[str] = field(default_factory=list)
    extra_files: dict[str, bytes] = field(default_factory=dict)  # e.g. tokenizer files for the model folder
    augment: Callable[[dict], dict] | None = None  # batch-level training augmentation, applied on the device


class SkipCounter:
    """Collate wrapper that drops examples a dataset returned as None, and counts them."""

    def __init__(self, collate: Callable[[list[Any]], Any]):
        self.collate = collate
        self.dropped = 0

    def __call__(self, items: list[Any]) -> Any:
        kept = [it for it in items if it is not None]
        self.dropped += len(items) - len(kept)
        return self.collate(kept) if kept else None
