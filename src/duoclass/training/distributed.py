"""Several processes, one run: the process group, and data decisions made once on rank 0.

Under torchrun (`duoclass train DATA --nproc N`) every process runs `api.train`. What is
decided from the data must be the same in every process, or DDP averages gradients of
models that disagree without noticing: the classes, the image size and mean/std, and a
vocabulary built from the training texts (a trained WordPiece tokenizer differs between
processes, tokenizers breaking ties in hash-map order; tfidf-mlp's n-grams). Rank 0
decides and sends its decisions with `broadcast_object_list`, so this works across
machines as well as on one, with no shared filesystem needed. Every process then checks
that its vocabulary hashes to rank 0's.

CPU example:  duoclass train ../shared/data/text/trec6 --model albert-scratch-tiny --nproc 2 --device cpu
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from duoclass.errors import DuoclassError

if TYPE_CHECKING:
    from duoclass.settings.config import TrainConfig
    from duoclass.data.splits import TaskData

log = logging.getLogger("duoclass")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def gather(obj: Any, d: Dist) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def vocabulary_digest(pre: Any) -> tuple[int, str] | None:
    """(size, sha256) of a text preprocessor's id-to-token map; None where there is none (hashed n-grams, images)."""
    if getattr(pre, "ngrams", None) is not None:  # tfidf-mlp: n-grams in id order, with their IDF
        table: Any = [pre.ngrams["features"], pre.ngrams["idf"]]
        n = len(pre.ngrams["features"])
    elif getattr(pre, "tokenizer", None) is not None:
        vocab = pre.tokenizer.get_vocab()  # token -> id, added tokens included
        table = sorted(vocab.items(), key=lambda kv: kv[1])
        n = len(vocab)
    else:
        return None
    blob = json.dumps(table, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return n, hashlib.sha256(blob).hexdigest()


def prepare_once(cfg: "TrainConfig", prepare: Callable[..., "TaskData"]) -> "TaskData":
    """`prepare(cfg)` with the data decisions of rank 0 in every process (see the module docstring).

    One process: just `prepare(cfg)`. Under torchrun this joins the process group (fit finds it
    joined). Images: every process reads and decodes its data at the same time, then takes rank
    0's classes, image size and mean/std. Text: rank 0 prepares first and sends its
    preprocessing settings and files ({name: bytes}); the others build their datasets with that
    preprocessor, `prepare(cfg, given=...)`, instead of training their own.
    """
    from duoclass.infer.torch_backend import pick_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        data = prepare(cfg)
        _log_vocabulary(data, 1)
        return data
    d = init_distributed(pick_device(cfg.device))
    if cfg.task == "image":
        data = prepare(cfg)
        decided = d.broadcast({"classes": data.classes, "model_args": data.model_args} if d.main else None)
        _check_classes(data.classes, decided["classes"], d.rank)
        size = decided["model_args"].get("image_size")
        if size != data.model_args.get("image_size"):  # this copy of the data differs; cache it at rank 0's size
            data = prepare(dataclasses.replace(cfg, image_size=size))
            _check_classes(data.classes, decided["classes"], d.rank)
        data.model_args = dict(decided["model_args"])
        return data
    data = prepare(cfg) if d.main else None
    given = d.broadcast({"preprocessing": data.preprocessor.to_config(), "files": data.extra_files,
                         "model_args": data.model_args, "classes": data.classes} if data is not None else None)
    if data is None:
        data = prepare(cfg, given=given)
        _check_classes(data.classes, given["classes"], d.rank)
    digests = gather(vocabulary_digest(data.preprocessor), d)
    if any(x != digests[0] for x in digests):
        per_rank = ", ".join(f"rank {r}: {x[1][:16] if x else 'none'}" for r, x in enumerate(digests))
        raise DuoclassError(f"the processes hold different vocabularies (sha256 {per_rank}); the model's token ids would "
                            "mean different tokens in each process. Report this with the command you ran")
    _log_vocabulary(data, d.world)
    return data


def _check_classes(mine: list[str], rank0: list[str], rank: int) -> None:
    if mine != rank0:
        raise DuoclassError(
            f"rank {rank} reads the classes {', '.join(mine)} but rank 0 reads {', '.join(rank0)}; "
            "every process needs the same copy of the data (check DATA on each machine)"
        )


def _log_vocabulary(data: "TaskData", world: int) -> None:
    digest = vocabulary_digest(data.preprocessor)
    if digest is not None:
        where = f", the same in all {world} processes" if world > 1 else ""
        log.info("vocabulary: %d tokens, sha256 %s%s", digest[0], digest[1][:16], where)
