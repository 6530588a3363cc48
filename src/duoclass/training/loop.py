"""The training engine, shared by images, text and masked-language pretraining.

`fit(cfg, data)` is the whole run, readable top to bottom:

    model (built from the settings, or given) -> loss, optimizer, schedule -> maybe resume -> each epoch:
        for each batch of the batch source: step(ctx, inputs, labels) (forward, loss, backward) -> optimizer step
        evaluate on valid (every process takes a share) -> keep the best model folder -> save state.pt
    -> evaluate the best model folder on valid and test -> write metrics and plots

Three seams, so new capabilities plug in without a second loop:

    model=   an nn.Module already built (pruned, quantization-aware, a masked language model, ...)
    step=    `step(ctx, inputs, labels) -> loss`: turns one batch into a loss and gradients
             (`standard_step` is cross-entropy; an adversarial step perturbs the inputs first).
             A step object may also have `describe() -> dict` (recorded in the model folder's
             training settings) and `after_epoch(model, epoch) -> {"metrics": {...}, "stop": reason}`
             (extra validation metrics; a stop reason ends the run without keeping that epoch)
    data.batches   a BatchSource (len + epoch(i) -> batches) instead of the DataLoader, e.g. data
             kept on the GPU with augmentation done there in batches

`data.evaluate`, `data.save` and `data.finish` (TaskData) let a task other than classification
(pretraining) keep its own metric and folder format. Under torchrun the loop runs in every
process with DistributedDataParallel; only rank 0 writes files.

CPU example:  duoclass train ../shared/data/images/pneumoniamnist --epochs 2 --device cpu
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import sys
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from duoclass.infer.torch_backend import TorchBackend, pick_device, to_device
from duoclass.artifacts.atomic import atomic_write_json, atomic_write_text
from duoclass.artifacts.state import load_state, save_state
from duoclass.artifacts.folder import save_model_folder
from duoclass.settings.config import TrainConfig
from duoclass.data.splits import TaskData
from duoclass.training.distributed import Dist, gather, init_distributed
from duoclass.errors import DuoclassError
from duoclass.report.heartbeat import Heartbeat
from duoclass.report.metrics import classification_metrics, select
from duoclass.models import count_params, create_model, resolve_name
from duoclass.infer.predict import cross_entropy, predict_probs, predict_views, views_to_probs
from duoclass.training.batches import Batch, LoaderSource, default_workers
from duoclass.training.optim import EMA, make_optimizer, make_schedule
from duoclass.training.steps import Step, StepContext, standard_step

log = logging.getLogger("duoclass")
SHORT = {"accuracy": "acc", "f1_macro": "f1"}  # names in the per-epoch log line


# --- randomness -----------------------------------------------------------------------------
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


# --- one epoch, and evaluation ------------------------------------------------------------------
def train_one_epoch(
    ctx: StepContext,
    batches: Iterable[Batch | None],
    optimizer: torch.optim.Optimizer,
    step: Step = standard_step,
    scheduler: Any = None,
    grad_clip: float = 0.0,
    ema: EMA | None = None,
    progress: tqdm | None = None,
    augment: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    max_steps: int = 0,
    heartbeat: Heartbeat | None = None,
) -> float:
    """One pass over `batches`; returns the mean training loss. The loss stays on the device until the end
    (no host-device sync per step); the progress bar reads it every 20 steps, and without a bar the
    heartbeat logs a line every minute."""
    ctx.model.train()
    total = torch.zeros((), dtype=torch.float32 if ctx.device.type == "mps" else torch.float64, device=ctx.device)
    count = 0
    first = ctx.step
    for batch in batches:
        if batch is None:  # every example of the batch was unusable
            continue
        if max_steps and ctx.step >= max_steps:
            break
        inputs, labels = batch
        inputs, labels = to_device(inputs, ctx.device), labels.to(ctx.device, non_blocking=True)
        if augment is not None:
            inputs = augment(inputs)
        optimizer.zero_grad(set_to_none=True)
        loss = step(ctx, inputs, labels)
        if ctx.scaler is not None:
            ctx.scaler.unscale_(optimizer)
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(ctx.model.parameters(), grad_clip)
        if ctx.scaler is not None:
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(ctx.model.module if hasattr(ctx.model, "module") else ctx.model)
        n = labels.shape[0]
        total += loss.to(total.dtype) * n
        count += n
        ctx.step += 1
        if heartbeat is not None:
            heartbeat.beat(ctx.step - first, lambda: f"loss {total.item() / count:.4f}")
        if progress is not None:
            progress.update(1)
            if progress.n % 20 == 0:
                progress.set_postfix(loss=f"{total.item() / count:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                     refresh=False)
    return total.item() / max(count, 1)


def sync_buffers(model: nn.Module, d: Dist) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics), so a sharded evaluation sees one model."""
    if d.world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def _inputs_and_labels(ds: Any, collate: Callable, cfg: TrainConfig) -> tuple[Iterable[dict[str, torch.Tensor]], list]:
    """(model inputs of `ds` in order, the list their labels are appended to as they are read)."""
    # a generator of its own: iterating a DataLoader draws a seed from it, and drawing from the global one
    # would shift the training randomness (augmentation, dropout) of every later epoch
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    ys: list[torch.Tensor] = []

    def inputs() -> Iterable[dict[str, torch.Tensor]]:
        for batch in loader:
            if batch is None:
                continue
            x, y = batch
            ys.append(y)
            yield x

    return inputs(), ys


def evaluate_dataset(model: nn.Module, ds: Any, collate: Callable, cfg: TrainConfig, device: torch.device,
                     classes: list[str], d: Dist = Dist(), amp: bool = False, tta: bool = False) -> dict[str, Any] | None:
    """Classification metrics of `model` on a labelled dataset, through the predict path (predict_probs).

    Under torchrun each process predicts every world-th example and rank 0 gathers them, so no
    process waits long for another; rank 0 gets the metrics, the others None.
    """
    part = ds if d.world == 1 else Subset(ds, list(range(d.rank, len(ds), d.world)))
    inputs, ys = _inputs_and_labels(part, collate, cfg)
    probs = predict_probs(TorchBackend(model, device, amp), inputs, tta)
    y = torch.cat(ys).numpy() if ys else np.zeros(0, dtype=np.int64)
    if d.world > 1:  # interleave the shards back into dataset order
        parts = gather((probs, y), d)
        if not d.main:
            return None
        n = sum(len(py) for _, py in parts)
        probs = np.zeros((n, len(classes)), dtype=np.float32)
        y = np.zeros(n, dtype=np.int64)
        for r, (pp, py) in enumerate(parts):
            probs[r::d.world][: len(py)] = pp
            y[r::d.world][: len(py)] = py
    return classification_metrics(y, probs, classes, top_k=cfg.top_k, loss=cross_entropy(probs, y))


def dataset_views(model: nn.Module, ds: Any, collate: Callable, cfg: TrainConfig, device: torch.device,
                  tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The logits (V, N, C) of `model` on a labelled dataset, through the predict path (predict_views), and the
    labels (N,); V = 2 with test-time augmentation. One process (the final evaluation runs on rank 0)."""
    inputs, ys = _inputs_and_labels(ds, collate, cfg)
    views = predict_views(TorchBackend(model, device), inputs, tta)
    return views, (torch.cat(ys).numpy() if ys else np.zeros(0, dtype=np.int64))


def final_metrics(views: np.ndarray, y: np.ndarray, cfg: TrainConfig, classes: list[str], temperature: float,
                  conformal: dict[str, Any] | None, operating: dict[str, Any] | None = None) -> dict[str, Any]:
    """The final evaluation of one split from its logits: full_metrics of the calibrated probabilities (what the
    model folder predicts), with the uncalibrated calibration figures beside them."""
    from duoclass.calibrate.conformal import prediction_sets
    from duoclass.report.metrics import calibration_metrics, full_metrics

    probs = views_to_probs(views, temperature)
    sets = prediction_sets(probs, conformal) if conformal is not None and len(y) else None
    m = full_metrics(y, probs, classes, top_k=cfg.top_k, loss=cross_entropy(probs, y), resamples=cfg.bootstrap,
                     seed=cfg.seed, sets=sets, alpha=None if conformal is None else conformal["alpha"])
    if len(y):
        raw = calibration_metrics(y, views_to_probs(views, 1.0))
        m["calibration"]["before"] = {k: raw[k] for k in ("ece", "mce", "brier", "nll")}
        m["calibration"]["temperature"] = temperature
        if operating is not None:
            from duoclass.report.intervals import operating_point_figures

            m["operating_point"] = {**operating, **operating_point_figures(probs[:, 1], y, operating["threshold"],
                                                                           cfg.bootstrap, cfg.seed)}
    return m


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


def model_config(cfg: TrainConfig, data: TaskData, model_name: str, model_args: dict[str, Any],
                 how: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of a model folder (schema: checkpoint.py): everything needed to rebuild, feed and evaluate it;
    `how` records how the model was trained (the training step's settings, e.g. adversarial mode and epsilon)."""
    from duoclass.artifacts.folder import model_folder_config

    return model_folder_config(
        data.task, model_name, model_args, data.classes, data.preprocessor.to_config(),
        evaluation={"tta": bool(cfg.tta), "top_k": cfg.top_k}, inputs=data.preprocessor.inputs(),
        training={"data": os.path.abspath(cfg.data), "seed": cfg.seed, "epochs": cfg.epochs, **(how or {"step": "standard"})},
    )


def show_progress(cfg: TrainConfig, d: Dist) -> bool:
    """A progress bar only for a person watching: rank 0, --progress, and stderr a terminal (not a log file)."""
    return cfg.progress and d.main and sys.stderr.isatty()


# fit is longer than the other functions on purpose: it is the whole loop, read top to bottom (the module
# docstring is its outline); each piece that has a name of its own (step, batches, optimizer, schedule, EMA,
# evaluation, saving) is a function of its own, so what is left here is the order in which they happen.
def fit(cfg: TrainConfig, data: TaskData, model: nn.Module | None = None, step: Step | None = None,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> RunResult:
    """Train, validate every epoch, keep the best model folder, evaluate it on test.

    model: an already built model to train (default: built from cfg.model and data.model_args).
    step: the training step (default `standard_step`). data.batches: a BatchSource (default: a DataLoader).
    on_epoch(epoch, valid_metrics), if given, is called on rank 0 at the end of every epoch
    (1-based), after the epoch's files (metrics, best model folder, state.pt) are written.
    An exception it raises ends the run and propagates out of `fit`; `duoclass tune` raises
    optuna.TrialPruned there to stop a bad trial early. Meant for single-process runs.
    """
    start = time.time()
    step = step or standard_step
    if cfg.lr is None or cfg.dropout is None:
        raise DuoclassError("fit: no learning rate or dropout; pass the settings through duoclass.training.run.resolve first")
    device = pick_device(cfg.device)
    d = init_distributed(device)
    seed_everything(cfg.seed + d.rank, cfg.deterministic)
    run_dir = Path(cfg.output)
    model_dir = run_dir / "model"
    state_path = run_dir / "state.pt"
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a new run (or --overwrite): an earlier run's curves must not mix with this one's
            for old in ("tensorboard", "metrics.csv", "metrics.jsonl", "skipped.csv", "state.pt"):
                if (run_dir / old).is_dir():
                    shutil.rmtree(run_dir / old)
                elif (run_dir / old).exists():
                    (run_dir / old).unlink()
        cfg.save(run_dir / "config.yaml")

    # model, loss, optimizer, schedule
    model_args = {k: v for k, v in data.model_args.items() if v is not None}
    model_name = data.model_name or resolve_name(cfg.model)
    if model is None:
        model_args["dropout"] = cfg.dropout
        build_args = dict(model_args, pretrained=cfg.pretrained) if cfg.pretrained else model_args
        model = create_model(model_name, len(data.classes), **build_args)
    model.to(device)
    weights = class_weights(data.train_labels, len(data.classes), cfg.class_weights)
    if weights is not None and d.main:
        log.info("class weights (%s, imbalanced data): %s", cfg.class_weights, ", ".join(f"{c}={w:.2f}" for c, w in zip(data.classes, weights.tolist())))
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None, label_smoothing=cfg.label_smoothing)
    optimizer = make_optimizer(model, cfg)
    source = data.batches or LoaderSource(data.train, data.collate, cfg, d, default_workers(cfg, data.train))
    scheduler, sched_when = make_schedule(optimizer, cfg, len(source))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    train_model: nn.Module = model
    if d.world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = StepContext(train_model, loss_fn, device, use_amp, scaler)
    evaluate = data.evaluate or (lambda m, split: evaluate_dataset(
        m, getattr(data, split), data.collate, cfg, device, data.classes, d, use_amp, cfg.tta))
    how = step.describe() if hasattr(step, "describe") else {"step": "standard"}  # recorded in the model folder
    save = data.save or (lambda folder, m, metrics: save_model_folder(
        folder, m.state_dict(), model_config(cfg, data, model_name, model_args, how), metrics=metrics,
        extra_files=data.extra_files))

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
        ctx.step = st.get("step", epoch0 * len(source))
        history = json.loads(st["history"])
        set_rng_state(st["rng"][min(d.rank, len(st["rng"]) - 1)])
        if d.main:
            log.info("resumed %s after epoch %d (best %s=%s at epoch %d)", cfg.resume, epoch0, cfg.select_metric, best, best_epoch)
        if epoch0 >= cfg.epochs and d.main:
            log.info("the run had already finished all %d epochs", cfg.epochs)

    writer = _tensorboard(run_dir / "tensorboard") if (cfg.tensorboard and d.main) else None
    if d.main:
        n_test = len(data.test) if data.test is not None else 0
        log.info(
            "%s: %s, %s, train %d / valid %d / test %d, %s parameters, device %s%s",
            data.task, model_name, "masked-LM" if data.task == "mlm" else f"{len(data.classes)} classes",
            len(data.train), len(data.valid), n_test,
            f"{count_params(model):,}", device, f" x {d.world} processes" if d.world > 1 else "",
        )
        for note in data.notes:
            log.info("%s", note)

    for epoch in range(epoch0, cfg.epochs):
        if cfg.max_steps and ctx.step >= cfg.max_steps:
            break
        t0 = time.time()
        ctx.epoch = epoch
        bar = tqdm(total=len(source), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_progress(cfg, d),
                   leave=False, dynamic_ncols=True)
        beat = Heartbeat(f"epoch {epoch + 1}/{cfg.epochs} steps", len(source)) if (d.main and bar.disable) else None
        train_loss = train_one_epoch(ctx, source.epoch(epoch), optimizer, step, scheduler if sched_when == "step" else None,
                                     cfg.grad_clip, ema, bar, data.augment, cfg.max_steps, beat)
        bar.close()
        # validation: every process predicts a share, rank 0 decides; its decisions are broadcast
        eval_model = ema.model if ema is not None else model
        sync_buffers(eval_model, d)
        vm = evaluate(eval_model, "valid")
        # a step may measure more after each epoch (adversarial training: accuracy under attack on a fixed
        # valid batch) and ask to stop when training went wrong (catastrophic overfitting): then this epoch
        # is not kept and the model folder stays at the last good one
        report = step.after_epoch(eval_model, epoch) if hasattr(step, "after_epoch") else {}
        stop = False
        if d.main:
            vm.update(report.get("metrics", {}))
            if cfg.select_metric not in vm:  # e.g. top5_accuracy with 3 classes (it is top3_accuracy there)
                raise DuoclassError(f"--select-metric {cfg.select_metric}: this run has no such metric (it has: "
                                    f"{', '.join(k for k, v in vm.items() if isinstance(v, float))})")
            score = vm[cfg.select_metric]
            if report.get("stop"):
                improved, stop = False, True
                log.warning("epoch %d: %s; stopping, the model folder keeps epoch %d", epoch + 1, report["stop"], best_epoch)
            else:
                improved, best, bad_epochs = select(cfg.select_metric, score, best, bad_epochs)
            if improved:
                best_epoch = epoch + 1
                save(model_dir, eval_model, {"epoch": epoch + 1, "valid": vm})
            row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                   **{f"valid_{k}": v for k, v in vm.items() if isinstance(v, float)}, "seconds": round(time.time() - t0, 2)}
            history.append(row)
            shown = [m for m in ("loss", "accuracy", "f1_macro") if m in vm]
            if cfg.select_metric not in shown:
                shown.append(cfg.select_metric)
            log.info("epoch %d/%d  train_loss %.4f  %s%s  (%.1fs)", epoch + 1, cfg.epochs, train_loss,
                     "  ".join(f"valid_{SHORT.get(m, m)} {vm[m]:.4f}" for m in shown),
                     "  *best*" if improved else "", time.time() - t0)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
            patience_out = cfg.early_stopping > 0 and bad_epochs >= cfg.early_stopping
            if patience_out:
                log.info("early stopping: no %s improvement for %d epochs", cfg.select_metric, cfg.early_stopping)
            stop = stop or patience_out
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
        rngs = gather(rng_state(), d)
        if d.main:
            save_state(state_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "ema": ema.model.state_dict() if ema else {},
                "epoch": epoch + 1, "step": ctx.step, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
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
            break
    if writer is not None:
        writer.close()

    finish = data.finish or finish_classification
    result = finish(cfg, data, run_dir, model_dir, device, best_epoch, history, start, d)
    d.barrier()
    return result  # type: ignore[return-value]


def finish_classification(cfg: TrainConfig, data: TaskData, run_dir: Path, model_dir: Path, device: torch.device,
                          best_epoch: int, history: list[dict], start: float, d: Dist) -> RunResult | None:
    """Evaluate the saved best model folder (the artifact users get) on valid and test; write reports (rank 0)."""
    from duoclass.calibrate.fit import fit_calibration
    from duoclass.infer.torch_backend import torch_backend_from_folder
    from duoclass.artifacts.folder import read_model_folder, update_model_folder
    from duoclass.report.plots import plot_calibration, plot_confusion, plot_curves, plot_ranking

    if not d.main:
        return None
    folder_cfg, state = read_model_folder(model_dir)  # the folder as a user loads it: hashes checked
    saved = torch_backend_from_folder(folder_cfg, state, model_dir, str(device)).model
    tta = bool(folder_cfg.get("evaluation", {}).get("tta", False))
    v_views, v_y = dataset_views(saved, data.valid, data.collate, cfg, device, tta)
    calibration, conformal = fit_calibration(v_views, v_y, cfg.calibration, cfg.conformal, cfg.conformal_score,
                                             cfg.seed, by_class=cfg.conformal_by_class)
    temperature = calibration["temperature"]
    operating = None
    if cfg.operating_point:
        from duoclass.calibrate.decide import choose_threshold
        from duoclass.settings.config import parse_operating_point

        metric, target = parse_operating_point(cfg.operating_point)
        operating = {"metric": metric, "target": target, "positive": data.classes[1],
                     "threshold": choose_threshold(views_to_probs(v_views, temperature)[:, 1], v_y, metric, target),
                     "chosen_on": "valid"}
    valid = final_metrics(v_views, v_y, cfg, data.classes, temperature, conformal, operating)
    test = None
    if data.test is not None:
        t_views, t_y = dataset_views(saved, data.test, data.collate, cfg, device, tta)
        test = final_metrics(t_views, t_y, cfg, data.classes, temperature, conformal, operating)
    if cfg.calibration != "none":
        log.info("calibration: temperature %.3f (valid NLL %.4f -> %.4f, ECE %.4f -> %.4f)", temperature,
                 calibration["nll_before"], calibration["nll_after"], calibration["ece_before"], calibration["ece_after"])
    skipped = len([s for s in data.skipped if getattr(s, "status", "bad") == "bad"]) + getattr(data.collate, "dropped", 0)
    ignored = len([s for s in data.skipped if getattr(s, "status", "") == "ignored"])
    seconds = time.time() - start
    summary = {"best_epoch": best_epoch, "valid": valid, "test": test, "skipped_files": skipped,
               "ignored_files": ignored, "seconds": round(seconds, 1), "model_dir": str(model_dir)}
    summary["calibration"] = calibration
    if conformal is not None:
        summary["conformal"] = conformal
    atomic_write_json(run_dir / "metrics.json", summary)
    update_model_folder(model_dir, metrics={"epoch": best_epoch, "valid": valid, "test": test},
                        settings={"calibration": calibration, "conformal": conformal, "operating_point": operating})
    if data.skipped:
        _write_skipped(run_dir, data.skipped)
    final = test or valid
    plot_confusion(final["confusion_matrix"], data.classes, run_dir / "confusion_matrix.png",
                   title=f"{'test' if test else 'valid'} confusion matrix (accuracy {final['accuracy']:.4f})")
    plot_curves(history, run_dir / "curves.png")
    if "calibration" in final:
        plot_calibration(final["calibration"], run_dir / "reliability.png", title=f"{'test' if test else 'valid'} reliability")
        plot_ranking(views_to_probs(t_views if test else v_views, temperature), t_y if test else v_y, data.classes,
                     run_dir / "roc_pr.png")
    if cfg.explain_examples:
        explain_report(model_dir, data.test if test else data.valid, t_views if test else v_views,
                       t_y if test else v_y, temperature, run_dir, device, cfg.explain_examples, "test" if test else "valid")
    log.info("best epoch %d (by valid %s): valid accuracy %.4f, balanced accuracy %.4f, f1_macro %.4f", best_epoch,
             cfg.select_metric, valid["accuracy"], valid["balanced_accuracy"], valid["f1_macro"])
    if test is not None:
        log.info("test accuracy %.4f, f1_macro %.4f, f1_weighted %.4f", test["accuracy"], test["f1_macro"], test["f1_weighted"])
        iv = test.get("intervals", {}).get("accuracy")
        if iv and test.get("roc_auc") is not None:
            log.info("test accuracy 95%% interval %.4f-%.4f; ROC AUC %.4f; ECE %.4f", iv["low"], iv["high"],
                     test["roc_auc"], test["calibration"]["ece"])
        if "operating_point" in test:
            op = test["operating_point"]
            log.info("operating point %s=%.2f (threshold %.4f on valid): test sensitivity %.4f, specificity %.4f",
                     op["metric"], op["target"], op["threshold"], op["sensitivity"], op["specificity"])
        if "conformal" in test:
            log.info("conformal sets (alpha %.2f): test coverage %.4f, mean size %.2f", test["conformal"]["alpha"],
                     test["conformal"]["coverage"], test["conformal"]["mean_size"])
    if skipped or ignored:
        log.warning("skipped %d unusable files and %d non-image files; see %s", skipped, ignored, run_dir / "skipped.csv")
    log.info("model folder: %s (%.1f s)", model_dir, seconds)
    return RunResult(run_dir, model_dir, best_epoch, valid, test, skipped, seconds)


def _write_skipped(run_dir: Path, skipped: list[Any]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "split", "label", "status", "reason"])
    for s in skipped:
        w.writerow([s.path, s.split, s.label, s.status, s.reason])
    atomic_write_text(run_dir / "skipped.csv", buf.getvalue())


def explain_report(model_dir: Path, ds: Any, views: np.ndarray, y: np.ndarray, temperature: float, run_dir: Path,
                   device: torch.device, per_class: int, split: str) -> None:
    """explanations.png: a few right and wrong examples per class of the evaluated split, explained by the saved
    model folder (infer.explain.report_grid). Needs the split's raw inputs (image paths, texts); a dataset
    without them, or whose evaluated rows do not line up with them (a file gone since the scan), gets none."""
    from duoclass.infer.classifier import Classifier
    from duoclass.infer.explain import report_grid

    raw = getattr(ds, "refs", None) or getattr(ds, "texts", None)
    if raw is None or len(raw) != len(y):
        log.info("explanations.png: not written (the %s split's raw inputs are not at hand)", split)
        return
    clf = Classifier.from_folder(model_dir, device=str(device))
    report_grid(clf, raw, y, views_to_probs(views, temperature), run_dir / "explanations.png", per_class,
                f"{split} examples")


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
