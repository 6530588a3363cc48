"""Optimizers and schedules of the training loop: Adam/AdamW (fused where every parameter allows),
warmup + cosine / one-cycle / reduce-on-plateau, and a weight EMA.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from duoclass.settings.config import TrainConfig

log = logging.getLogger("duoclass")


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
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
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
    if cfg.schedule == "linear":  # linear warmup, then linear decay to 0 (BERT's pretraining schedule)
        warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))), "step"
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
