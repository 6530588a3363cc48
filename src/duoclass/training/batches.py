"""Batch sources of the training loop: anything with `len()` and `epoch(i)` yielding (inputs, labels);
the default wraps a DataLoader, with length-bucketed batches for transformers.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Protocol

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from duoclass.settings.config import TrainConfig
from duoclass.training.distributed import Dist

log = logging.getLogger("duoclass")

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


# --- batches ------------------------------------------------------------------------------------
class BatchSource(Protocol):
    """Where training batches come from: `len` batches per epoch (this process), `epoch(i)` yields them."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterable[Batch | None]: ...


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled batches of examples of similar length, so little of each batch is padding.

    The examples are shuffled, cut into pools of `pool` batches, each pool is sorted by length
    and cut into batches, and the batches are shuffled. Every pool but the last holds a whole
    number of batches, so at most one batch is short (dropped with drop_last). The order
    depends only on the generator, so a resumed run sees the same batches. With several
    processes, rank r takes batches r, r + world, ... (the same number on every rank).
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, drop_last: bool,
                 rank: int = 0, world: int = 1, pool: int = 50):
        self.lengths, self.batch_size, self.generator, self.drop_last = lengths, batch_size, generator, drop_last
        self.rank, self.world, self.pool = rank, world, pool

    def __len__(self) -> int:
        n, b = len(self.lengths), self.batch_size
        count = n // b + (0 if self.drop_last or n % b == 0 else 1)
        return count // self.world

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size = self.batch_size * self.pool
        batches: list[list[int]] = []
        for i in range(0, len(order), size):
            chunk = sorted(order[i : i + size], key=self.lengths.__getitem__)
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        batches = [batches[k] for k in torch.randperm(len(batches), generator=self.generator).tolist()]
        yield from batches[self.rank : len(self) * self.world : self.world]



def make_loader(ds: Any, cfg: TrainConfig, collate: Callable, shuffle: bool, epoch: int, d: Dist, workers: int) -> DataLoader:
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # data order depends only on (seed, epoch)
    drop_last = shuffle and len(ds) > cfg.batch_size * d.world
    common = dict(collate_fn=collate, num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available())
    if shuffle and cfg.length_buckets and getattr(ds, "bucket", False):  # transformers: batch similar lengths together
        bs = BucketBatchSampler(ds.lengths(), cfg.batch_size, g, drop_last, d.rank, d.world)
        return DataLoader(ds, batch_sampler=bs, **common)
    if d.world > 1 and shuffle:
        sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    elif shuffle:
        sampler = RandomSampler(ds, generator=g)
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=shuffle and len(ds) > cfg.batch_size,
                      generator=g, **common)


class LoaderSource:
    """The default batch source: a DataLoader over a dataset, reshuffled from (seed, epoch) every epoch."""

    def __init__(self, ds: Any, collate: Callable, cfg: TrainConfig, d: Dist, workers: int):
        self.ds, self.collate, self.cfg, self.d, self.workers = ds, collate, cfg, d, workers
        self._len = len(make_loader(ds, cfg, collate, True, 0, d, 0))

    def __len__(self) -> int:
        return self._len

    def epoch(self, epoch: int) -> Iterable[Batch | None]:
        if hasattr(self.ds, "set_epoch"):  # per-epoch randomness of the dataset itself (text augmentation)
            self.ds.set_epoch(epoch)
        return make_loader(self.ds, self.cfg, self.collate, True, epoch, self.d, self.workers)


def default_workers(cfg: TrainConfig, ds: Any) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return 0 if getattr(ds, "cache", None) is not None else min(4, os.cpu_count() or 1)
