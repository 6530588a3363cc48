"""The training engine, shared by images and text.

`fit(cfg, data)` is the whole run, readable top to bottom:

    build model, loss, optimizer, schedule -> maybe resume -> for each epoch:
        train_one_epoch -> evaluate on valid -> keep the best model folder -> save state
    -> evaluate the best model folder on test -> write metrics, plots

`train_one_epoch`, `evaluate` and `predict_probs` are plain functions that other code
(adversarial training, export checks, the server) reuses. Under torchrun the loop runs
in every process with DistributedDataParallel; only rank 0 writes files.

CPU example:  duoclass train ../shared/data/images/pneumoniamnist --epochs 2 --device cpu
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from tqdm.auto import tqdm

from .checkpoint import atomic_write_json, atomic_write_text, load_state, save_model_folder, save_state
from .config import TrainConfig
from .data.splits import TaskData
from .errors import DuoclassError
from .metrics import classification_metrics, select
from .models import count_params, create_model, resolve_name

log = logging.getLogger("duoclass")


# --- devices and processes ------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DuoclassError("--device cuda: no CUDA device is visible; use --device cpu or --device auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DuoclassError("--device mps: MPS is not available here; use --device cpu or --device auto")
    return torch.device(name)


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


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    """Every RNG state as plain Python values (no tensors): safe to gather between processes."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- building blocks ------------------------------------------------------------------------
def class_weights(labels: list[int], n_classes: int, mode: str) -> torch.Tensor | None:
    """Loss weights (mean 1) when classes are imbalanced (largest/smallest > 1.5), else None.

    balanced: inverse class frequency; sqrt (and auto): its square root, which corrects the
    imbalance only half way in log space and over-corrects less when the model memorises.
    """
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if counts.min() == 0 or counts.max() / counts.min() <= 1.5:
        return None
    w = counts.sum() / (n_classes * counts)
    if mode in ("sqrt", "auto"):
        w = np.sqrt(w)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


FUSED = True  # fused optimizer kernels where every parameter allows them; benchmarks/optimizer_step.py turns it off


def adam(model: nn.Module, lr: float, weight_decay: float, decoupled: bool = True) -> torch.optim.Optimizer:
    """AdamW (or Adam) with no weight decay on biases and norm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does the same arithmetic in one pass per tensor: 3-9x faster steps than the
    # per-tensor loop on a CPU (benchmarks/optimizer_step.py), most for wide embedding tables.
    fused = FUSED and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(groups, lr=lr, fused=fused or None)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return adam(model, cfg.lr, cfg.weight_decay, decoupled=cfg.optimizer != "adam")


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> tuple[Any, str]:
    """(scheduler, when): 'step' schedulers step every batch, 'epoch' ones after validation."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def f(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        return torch.optim.lr_scheduler.LambdaLR(opt, f), "step"
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1)), "step"
    if cfg.schedule == "plateau":
        mode = "min" if cfg.select_metric == "loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=2), "epoch"
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), "step"


class EMA:
    """Exponential moving average of parameters and buffers, used for evaluation when enabled."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)
            else:
                e.copy_(m)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# --- the loops ------------------------------------------------------------------------------
def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    grad_clip: float = 0.0,
    ema: EMA | None = None,
    progress: tqdm | None = None,
    augment: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> float:
    """One pass over `loader`; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        if batch is None:  # every example of the batch was unusable
            continue
        inputs, labels = batch
        inputs, labels = to_device(inputs, device), labels.to(device, non_blocking=True)
        if augment is not None:
            inputs = augment(inputs)
        with autocast(device, amp):
            logits = model(inputs)  # (B, C)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model.module if hasattr(model, "module") else model)
        n = labels.numel()
        total += loss.item() * n
        count += n
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total / count:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    return total / max(count, 1)


@torch.no_grad()
def predict_probs(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, amp: bool = False, tta: bool = False
) -> np.ndarray:
    """Softmax probabilities (N, C) for an iterable of input dicts."""
    model.eval()
    out = []
    for inputs in batches:
        inputs = to_device(inputs, device)
        with autocast(device, amp):
            logits = model(inputs).float()
            if tta and "pixel_values" in inputs:
                flipped = {**inputs, "pixel_values": inputs["pixel_values"].flip(-1)}
                logits = (logits.softmax(-1) + model(flipped).float().softmax(-1)).log()
        out.append(logits.softmax(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, classes: list[str], top_k: int = 5,
    loss_fn: Callable | None = None, amp: bool = False, tta: bool = False,
) -> dict[str, Any]:
    """Metrics of `model` on a labelled loader."""
    ys: list[torch.Tensor] = []

    def inputs() -> Iterable[dict[str, torch.Tensor]]:
        for batch in loader:
            if batch is None:
                continue
            x, y = batch
            ys.append(y)
            yield x

    probs = predict_probs(model, inputs(), device, amp, tta)
    y = torch.cat(ys).numpy() if ys else np.zeros(0, dtype=np.int64)
    loss = None
    if loss_fn is not None and len(y):
        loss = float(loss_fn(torch.from_numpy(np.log(np.clip(probs, 1e-12, None))), torch.from_numpy(y)))
    return classification_metrics(y, probs, classes, top_k=top_k, loss=loss)


# --- the run --------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    best_epoch: int
    valid: dict[str, Any]
    test: dict[str, Any] | None
    skipped: int
    seconds: float


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


def model_config(cfg: TrainConfig, data: TaskData, model_name: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """The config.json of a model folder: everything needed to rebuild and feed the model."""
    return {
        "task": data.task,
        "model": {"name": model_name, "args": model_args},
        "classes": list(data.classes),
        "preprocessing": data.preprocessor.to_config(),
        "training": {"data": cfg.data, "seed": cfg.seed, "epochs": cfg.epochs},
    }


def fit(cfg: TrainConfig, data: TaskData, on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> RunResult:
    """Train, validate every epoch, keep the best model folder, evaluate it on test.

    on_epoch(epoch, valid_metrics), if given, is called on rank 0 at the end of every epoch
    (1-based), after the epoch's files (metrics, best model folder, state.pt) are written.
    An exception it raises ends the run and propagates out of `fit`; `duoclass tune` raises
    optuna.TrialPruned there to stop a bad trial early. Meant for single-process runs.
    """
    start = time.time()
    if cfg.lr is None or cfg.dropout is None:
        raise DuoclassError("fit: no learning rate or dropout; pass the settings through api.resolve_settings first")
    device = pick_device(cfg.device)
    d = init_distributed(device)
    seed_everything(cfg.seed + d.rank, cfg.deterministic)
    run_dir = Path(cfg.output)
    model_dir = run_dir / "model"
    state_path = run_dir / "state.pt"
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")

    # model, loss, optimizer, schedule
    model_args = {k: v for k, v in data.model_args.items() if v is not None}
    model_args["dropout"] = cfg.dropout
    build_args = dict(model_args, pretrained=cfg.pretrained) if cfg.pretrained else model_args
    model_name = resolve_name(cfg.model)
    model = create_model(model_name, len(data.classes), **build_args)
    model.to(device)
    weights = class_weights(data.train_labels, len(data.classes), cfg.class_weights)
    if weights is not None and d.main:
        log.info("class weights (%s, imbalanced data): %s", cfg.class_weights, ", ".join(f"{c}={w:.2f}" for c, w in zip(data.classes, weights.tolist())))
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None, label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    optimizer = make_optimizer(model, cfg)
    workers = cfg.workers if cfg.workers >= 0 else (0 if getattr(data.train, "cache", None) is not None else min(4, os.cpu_count() or 1))
    steps_per_epoch = len(make_loader(data.train, cfg, data.collate, True, 0, d, 0))
    scheduler, sched_when = make_schedule(optimizer, cfg, steps_per_epoch)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    train_model: nn.Module = model
    if d.world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # resume
    epoch0, best, best_epoch, bad_epochs, history = 0, None, 0, 0, []
    if cfg.resume:
        st = load_state(Path(cfg.resume) / "state.pt")
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        if ema is not None and st.get("ema"):
            ema.model.load_state_dict(st["ema"])
        epoch0, best, best_epoch, bad_epochs = st["epoch"], st["best"], st["best_epoch"], st["bad_epochs"]
        history = json.loads(st["history"])
        set_rng_state(st["rng"][min(d.rank, len(st["rng"]) - 1)])
        if d.main:
            log.info("resumed %s after epoch %d (best %s=%s at epoch %d)", cfg.resume, epoch0, cfg.select_metric, best, best_epoch)
        if epoch0 >= cfg.epochs and d.main:
            log.info("the run had already finished all %d epochs", cfg.epochs)

    writer = _tensorboard(run_dir / "tensorboard") if (cfg.tensorboard and d.main) else None
    if d.main:
        log.info(
            "%s: %s, %d classes, train %d / valid %d / test %d, %s parameters, device %s%s",
            data.task, model_name, len(data.classes), len(data.train), len(data.valid),
            len(data.test) if data.test is not None else 0, f"{count_params(model):,}", device,
            f" x {d.world} processes" if d.world > 1 else "",
        )
        for note in data.notes:
            log.info("%s", note)

    for epoch in range(epoch0, cfg.epochs):
        t0 = time.time()
        if hasattr(data.train, "set_epoch"):  # per-epoch randomness of the dataset itself (text augmentation)
            data.train.set_epoch(epoch)
        loader = make_loader(data.train, cfg, data.collate, True, epoch, d, workers)
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and d.main), leave=False, dynamic_ncols=True)
        train_loss = train_one_epoch(
            train_model, loader, optimizer, loss_fn, device, scheduler if sched_when == "step" else None,
            scaler, use_amp, cfg.grad_clip, ema, bar, data.augment,
        )
        bar.close()
        # validation on rank 0 with the full valid set; decisions are broadcast
        eval_model = ema.model if ema is not None else model
        stop = False
        if d.main:
            vloader = make_loader(data.valid, cfg, data.collate, False, epoch, Dist(), 0)
            vm = evaluate(eval_model, vloader, device, data.classes, cfg.top_k, eval_loss, use_amp, cfg.tta)
            if cfg.select_metric not in vm or not isinstance(vm[cfg.select_metric], float):
                raise DuoclassError(f"--select-metric: unknown metric {cfg.select_metric!r}; use balanced_accuracy, accuracy, f1_macro, loss, ...")
            score = vm[cfg.select_metric]
            improved, best, bad_epochs = select(cfg.select_metric, score, best, bad_epochs)
            if improved:
                best_epoch = epoch + 1
                save_model_folder(model_dir, eval_model.state_dict(), model_config(cfg, data, model_name, model_args),
                                  metrics={"epoch": epoch + 1, "valid": vm}, extra_files=data.extra_files)
            row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                   **{f"valid_{k}": v for k, v in vm.items() if isinstance(v, float)}, "seconds": round(time.time() - t0, 2)}
            history.append(row)
            log.info(
                "epoch %d/%d  train_loss %.4f  valid_loss %.4f  valid_acc %.4f  valid_f1 %.4f%s%s  (%.1fs)",
                epoch + 1, cfg.epochs, train_loss, vm.get("loss", float("nan")), vm["accuracy"], vm["f1_macro"],
                "" if cfg.select_metric in ("loss", "accuracy", "f1_macro") else f"  valid_{cfg.select_metric} {score:.4f}",
                "  *best*" if improved else "", time.time() - t0,
            )
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
            stop = cfg.early_stopping > 0 and bad_epochs >= cfg.early_stopping
            if sched_when == "epoch":
                scheduler.step(score)
            _write_history(run_dir, history)
        if sched_when == "epoch" and d.world > 1:
            # keep every rank's plateau scheduler in step with rank 0's decision
            lr = d.broadcast(optimizer.param_groups[0]["lr"])
            for g in optimizer.param_groups:
                g["lr"] = lr
        stop = d.broadcast(stop)
        # every rank contributes its RNG state; rank 0 writes the state file
        rngs = _gather(rng_state(), d)
        if d.main:
            save_state(state_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "ema": ema.model.state_dict() if ema else {},
                "epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "history": json.dumps(history), "rng": rngs,
            })
        d.barrier()
        if on_epoch is not None and d.main:
            try:
                on_epoch(epoch + 1, vm)
            except BaseException:
                if writer is not None:
                    writer.close()
                raise
        if stop:
            if d.main:
                log.info("early stopping: no %s improvement for %d epochs", cfg.select_metric, cfg.early_stopping)
            break
    if writer is not None:
        writer.close()

    result = None
    if d.main:
        result = _finish(cfg, data, run_dir, model_dir, device, best_epoch, history, start, use_amp)
    d.barrier()
    return result  # type: ignore[return-value]


def _finish(cfg: TrainConfig, data: TaskData, run_dir: Path, model_dir: Path, device: torch.device,
            best_epoch: int, history: list[dict], start: float, amp: bool) -> RunResult:
    """Evaluate the saved best model folder (the artifact users get) on valid and test; write reports."""
    from .api import load
    from .report import plot_confusion, plot_curves

    clf = load(model_dir, device=str(device))
    vloader = make_loader(data.valid, cfg, data.collate, False, 0, Dist(), 0)
    valid = evaluate(clf.model, vloader, device, data.classes, cfg.top_k, nn.CrossEntropyLoss(), amp, cfg.tta)
    test = None
    if data.test is not None:
        tloader = make_loader(data.test, cfg, data.collate, False, 0, Dist(), 0)
        test = evaluate(clf.model, tloader, device, data.classes, cfg.top_k, nn.CrossEntropyLoss(), amp, cfg.tta)
    skipped = len([s for s in data.skipped if getattr(s, "status", "bad") == "bad"]) + getattr(data.collate, "dropped", 0)
    ignored = len([s for s in data.skipped if getattr(s, "status", "") == "ignored"])
    seconds = time.time() - start
    summary = {"best_epoch": best_epoch, "valid": valid, "test": test, "skipped_files": skipped,
               "ignored_files": ignored, "seconds": round(seconds, 1), "model_dir": str(model_dir)}
    atomic_write_json(run_dir / "metrics.json", summary)
    # the model folder carries the final evaluation too (its hash list does not cover metrics.json)
    atomic_write_json(model_dir / "metrics.json", {"epoch": best_epoch, "valid": valid, "test": test})
    if data.skipped:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "split", "label", "status", "reason"])
        for s in data.skipped:
            w.writerow([s.path, s.split, s.label, s.status, s.reason])
        atomic_write_text(run_dir / "skipped.csv", buf.getvalue())
    final = test or valid
    plot_confusion(final["confusion_matrix"], data.classes, run_dir / "confusion_matrix.png",
                   title=f"{'test' if test else 'valid'} confusion matrix (accuracy {final['accuracy']:.4f})")
    plot_curves(history, run_dir / "curves.png")
    log.info("best epoch %d (by valid %s): valid accuracy %.4f, balanced accuracy %.4f, f1_macro %.4f", best_epoch,
             cfg.select_metric, valid["accuracy"], valid["balanced_accuracy"], valid["f1_macro"])
    if test is not None:
        log.info("test accuracy %.4f, f1_macro %.4f, f1_weighted %.4f", test["accuracy"], test["f1_macro"], test["f1_weighted"])
    if skipped or ignored:
        log.warning("skipped %d unusable files and %d non-image files; see %s", skipped, ignored, run_dir / "skipped.csv")
    log.info("model folder: %s (%.1f s)", model_dir, seconds)
    return RunResult(run_dir, model_dir, best_epoch, valid, test, skipped, seconds)


def _gather(obj: Any, d: Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _write_history(run_dir: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
