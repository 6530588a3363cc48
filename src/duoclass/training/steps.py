"""Training steps: `step(ctx, inputs, labels) -> loss` turns one batch into a loss and gradients.

`standard_step` is cross-entropy; train.adversarial builds the adversarial ones. `StepContext` is what
the loop hands every step (model, loss, scaler, device, autocast).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from duoclass.infer.torch_backend import autocast

log = logging.getLogger("duoclass")


# --- the training step ------------------------------------------------------------------------
@dataclass
class StepContext:
    """What a training step may use: the training model (DDP-wrapped under torchrun), the loss, the device."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    amp: bool = False
    scaler: torch.amp.GradScaler | None = None
    epoch: int = 0  # 0-based
    step: int = 0  # optimizer steps taken so far in the run

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C), under autocast when mixed precision is on."""
        with autocast(self.device, self.amp):
            return self.model(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled when an fp16 GradScaler is in use."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


Step = Callable[[StepContext, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def standard_step(ctx: StepContext, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the batch as it is; returns the (detached) loss."""
    loss = ctx.loss_fn(ctx.forward(inputs).float(), labels)
    ctx.backward(loss)
    return loss.detach()
