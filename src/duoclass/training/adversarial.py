"""Adversarial training as a step of the one training loop (`--adversarial fgsm|pgd|trades|fgm`).

The attacks themselves are robust.attacks; this module turns them into training steps, checks the
settings (`check_adversarial`) and runs the catastrophic-overfitting guard (PGD-10 accuracy on a fixed
valid batch after each epoch).
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from duoclass.infer.torch_backend import autocast
from duoclass.settings.budget import DEFAULT_EPS, eps_value
from duoclass.errors import DuoclassError
from duoclass.robust.attacks import pgd_step_size, _attack, _cross_entropy, _random_start, input_embeddings, unwrap

if TYPE_CHECKING:
    from duoclass.settings.config import TrainConfig
    from duoclass.data.splits import TaskData
    from duoclass.training.steps import StepContext

log = logging.getLogger("duoclass")

IMAGE_MODES = ("fgsm", "pgd", "trades")
TEXT_MODES = ("fgm", "pgd")
GUARD_EXAMPLES = 256  # size of the fixed validation batch of the catastrophic-overfitting guard
GUARD_STEPS = 10


def check_adversarial(cfg: "TrainConfig", task: str | None = None) -> float | None:
    """Refuse an --adversarial mode the task has no meaning for, or a bad --eps; the eps to use (None when off)."""
    task = task or cfg.task
    mode = cfg.adversarial
    if mode == "none":
        return None
    if task == "text" and mode not in TEXT_MODES:
        what = "FGSM perturbs pixels" if mode == "fgsm" else f"{mode} is for image models"
        raise DuoclassError(f"--adversarial {mode}: {what}; for text models use --adversarial fgm or "
                            "--adversarial pgd (perturbations of the input embeddings)")
    if task == "image" and mode not in IMAGE_MODES:
        raise DuoclassError(f"--adversarial {mode}: it perturbs the input embeddings of text models; for image "
                            "models use --adversarial fgsm, pgd or trades")
    if task not in ("image", "text"):
        raise DuoclassError(f"--adversarial {mode}: adversarial training applies to image and text classification "
                            f"only, not to {task}")
    return eps_value(cfg.eps, task)


# --- attacks -----------------------------------------------------------------------------------


class AdversarialStep:
    """A training step (`engine.Step`) on adversarial examples; the modes are in the module docstring.

    step(ctx, inputs, labels) crafts the perturbation on the unwrapped model (under autocast like
    ctx.forward), then runs one forward of the batch (its first `ratio` share adversarial) through
    ctx.model and ctx.backward. describe() is what the model folder records; after_epoch() is the
    catastrophic-overfitting guard (images, given a fixed `guard` batch of validation examples).
    """

    def __init__(self, mode: str, eps: float, *, task: str = "image", steps: int = 7, ratio: float = 1.0,
                 eps_warmup: float = 0.0, trades_beta: float = 6.0, steps_per_epoch: int = 1,
                 guard: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None, eps_setting: str | None = None,
                 amp: bool = False):
        modes = TEXT_MODES if task == "text" else IMAGE_MODES
        if mode not in modes:
            raise DuoclassError(f"--adversarial {mode}: not a {task} mode; choose one of: {', '.join(modes)}")
        if steps < 1:
            raise DuoclassError(f"--adv-steps: got {steps}; an attack needs at least one step, e.g. --adv-steps 7")
        self.mode, self.eps, self.task, self.ratio = mode, float(eps), task, ratio
        self.steps = 1 if mode in ("fgsm", "fgm") else steps
        self.eps_warmup, self.trades_beta, self.steps_per_epoch = eps_warmup, trades_beta, max(1, steps_per_epoch)
        self.guard, self.eps_setting, self.amp = guard, eps_setting, amp
        self.history: list[tuple[float, float]] = []  # (PGD accuracy, clean accuracy) on the guard batch, per epoch

    # -- settings
    def alpha(self, eps: float) -> float:
        """Step size: 1.25 eps for FGSM from a random start, eps for FGM, 2.5 eps / steps for PGD and TRADES."""
        return {"fgsm": 1.25 * eps, "fgm": eps}.get(self.mode, pgd_step_size(eps, self.steps))

    def eps_at(self, step: int) -> float:
        """eps after `step` optimizer steps: a linear ramp from 0 over eps_warmup epochs, then constant."""
        if self.eps_warmup <= 0:
            return self.eps
        return self.eps * min(1.0, (step + 1) / (self.eps_warmup * self.steps_per_epoch))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": "adversarial", "mode": self.mode, "eps": self.eps, "eps_setting": self.eps_setting,
            "norm": "linf" if self.task == "image" else "l2", "space": "pixels" if self.task == "image" else "input embeddings",
            "steps": self.steps, "alpha": self.alpha(self.eps), "ratio": self.ratio, "eps_warmup": self.eps_warmup,
        }
        if self.mode == "trades":
            out["trades_beta"] = self.trades_beta
        if self.guard is not None:
            out["guard"] = {"examples": int(self.guard[1].shape[0]), "pgd_steps": GUARD_STEPS}
        return out

    def _n_adv(self, batch: int) -> int:
        return min(batch, max(1, round(self.ratio * batch)))

    @staticmethod
    def _grad_scale(ctx: "StepContext") -> float:
        return float(ctx.scaler.get_scale()) if ctx.scaler is not None else 1.0

    # -- the step
    def __call__(self, ctx: "StepContext", inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if self.task == "text":
            return self._text_step(ctx, inputs, labels)
        return self._image_step(ctx, inputs, labels)

    def _image_step(self, ctx: "StepContext", inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        model = unwrap(ctx.model)
        x = inputs["pixel_values"]
        b = x.shape[0]
        n = self._n_adv(b)
        xa, ya = x[:n], labels[:n]
        eps = self.eps_at(ctx.step)
        scale = self._grad_scale(ctx)
        # The attack's passes need no gradient of the parameters (_frozen), so they leave none behind.
        with autocast(ctx.device, ctx.amp):
            if self.mode == "trades":
                was_training = model.training
                model.eval()
                try:
                    with torch.no_grad():
                        p_clean = model({"pixel_values": xa}).float().softmax(-1)
                    start = (xa + 0.001 * torch.randn_like(xa)).clamp(0, 1)
                    kl = lambda logits: F.kl_div(logits.float().log_softmax(-1), p_clean, reduction="sum")  # noqa: E731
                    x_adv = _attack(model, xa, kl, eps, self.steps, self.alpha(eps), "linf", start, scale)
                finally:
                    model.train(was_training)
            else:
                start = _random_start(xa, eps, "linf")
                x_adv = _attack(model, xa, _cross_entropy(ya), eps, self.steps, self.alpha(eps), "linf", start, scale)
        if self.mode == "trades":
            # one forward of the clean batch and the adversarial examples together (BatchNorm sees both)
            logits = ctx.forward({**inputs, "pixel_values": torch.cat([x, x_adv])}).float()
            clean, adv = logits[:b], logits[b:]
            robust = F.kl_div(adv.log_softmax(-1), clean[:n].softmax(-1), reduction="sum") / b
            loss = ctx.loss_fn(clean, labels) + self.trades_beta * robust
        else:
            mixed = torch.cat([x_adv, x[n:]]) if n < b else x_adv
            loss = ctx.loss_fn(ctx.forward({**inputs, "pixel_values": mixed}).float(), labels)
        ctx.backward(loss)
        return loss.detach()

    def _text_step(self, ctx: "StepContext", inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        model = unwrap(ctx.model)
        weight = input_embeddings(model, self.mode).weight  # (V, D)
        b = labels.shape[0]
        n = self._n_adv(b)
        adv_inputs = {k: v[:n] for k, v in inputs.items()} if n < b else inputs
        ya = labels[:n]
        eps = self.eps_at(ctx.step)
        alpha = self.alpha(eps)
        # The clean loss, forward and backward on the unwrapped model: its gradients wait in .grad and are
        # synchronised with the adversarial ones by the backward through ctx.model below (as under no_sync).
        with autocast(ctx.device, ctx.amp):
            clean = ctx.loss_fn(model(inputs).float(), labels)
        ctx.backward(clean)
        if weight.grad is None:
            raise DuoclassError(f"--adversarial {self.mode}: the input embeddings got no gradient (are they frozen?); "
                                "use --adversarial none for this model")
        grad = weight.grad.detach()
        original = weight.detach().clone()
        scale = self._grad_scale(ctx)
        try:
            for k in range(self.steps):
                with torch.no_grad():
                    weight.add_(grad * (alpha / (grad.norm() + 1e-12)))
                    delta = weight - original  # project onto the L2 ball of radius eps
                    weight.copy_(original + delta * torch.clamp(eps / (delta.norm() + 1e-12), max=1.0))
                if k < self.steps - 1:
                    with autocast(ctx.device, ctx.amp), torch.enable_grad():
                        loss_k = ctx.loss_fn(model(adv_inputs).float(), ya)
                    (grad,) = torch.autograd.grad(loss_k * scale if scale != 1 else loss_k, weight)
            adv = ctx.loss_fn(ctx.forward(adv_inputs).float(), ya)
            ctx.backward(adv)
        finally:
            with torch.no_grad():
                weight.copy_(original)  # the gradients were taken at the perturbed weights; the step applies to these
        return (clean + adv).detach()

    # -- the catastrophic-overfitting guard
    def after_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """PGD-10 and clean accuracy of `model` on the fixed guard batch; a stop reason when PGD accuracy collapsed."""
        if self.guard is None:
            return {}
        inputs, labels = self.guard
        device = next(model.parameters()).device
        x, y = inputs["pixel_values"].to(device), labels.to(device)
        was_training = model.training
        model.eval()
        try:
            with autocast(device, self.amp):
                with torch.no_grad():
                    clean = (model({"pixel_values": x}).argmax(-1) == y).float().mean().item()
                # the same random start every epoch, and the training RNG stays untouched
                gen = torch.Generator(device=device).manual_seed(0)
                start = _random_start(x, self.eps, "linf", gen)
                x_adv = _attack(model, x, _cross_entropy(y), self.eps, GUARD_STEPS, pgd_step_size(self.eps, GUARD_STEPS),
                                "linf", start)
                with torch.no_grad():
                    robust = (model({"pixel_values": x_adv}).argmax(-1) == y).float().mean().item()
        finally:
            model.train(was_training)
        return self.judge(robust, clean)

    def judge(self, robust: float, clean: float) -> dict[str, Any]:
        """Record one epoch's (PGD, clean) accuracy on the guard batch; stop when PGD accuracy fell below 30% of
        its best (after it had been above 0.2) while clean accuracy stayed above 70% of its value then."""
        report: dict[str, Any] = {"metrics": {"pgd_accuracy": robust, "pgd_clean_accuracy": clean}}
        best = max(self.history, default=None, key=lambda h: h[0])
        self.history.append((robust, clean))
        if best is not None and best[0] > 0.2 and robust < 0.3 * best[0] and clean >= 0.7 * best[1]:
            report["stop"] = (f"catastrophic overfitting: PGD accuracy on a fixed valid batch fell from {best[0]:.3f} "
                              f"to {robust:.3f} while clean accuracy is {clean:.3f}")
        return report


def _guard_batch(data: "TaskData") -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Up to GUARD_EXAMPLES validation examples spread evenly over the split (so every class is likely in)."""
    n = len(data.valid)
    if n == 0:
        return None
    idx = list(range(0, n, max(1, n // GUARD_EXAMPLES)))[:GUARD_EXAMPLES]
    items = [it for it in (data.valid[i] for i in idx) if it is not None]
    if not items:
        return None
    inputs, labels = data.collate(items)
    return {"pixel_values": inputs["pixel_values"]}, labels


def make_step(cfg: "TrainConfig", data: "TaskData") -> AdversarialStep | None:
    """The training step --adversarial asks for (None when it is "none": the engine's standard step)."""
    eps = check_adversarial(cfg, data.task)
    if eps is None:
        return None
    if data.task == "text" and cfg.eps == DEFAULT_EPS:
        log.info("--adversarial %s: text perturbs the input embeddings; eps = %s (L2 norm of the perturbation)",
                 cfg.adversarial, eps)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = len(data.batches) if data.batches is not None else len(data.train) // (cfg.batch_size * world)
    return AdversarialStep(
        cfg.adversarial, eps, task=data.task, steps=cfg.adv_steps, ratio=cfg.adv_ratio, eps_warmup=cfg.eps_warmup,
        trades_beta=cfg.trades_beta, steps_per_epoch=steps_per_epoch, eps_setting=str(cfg.eps), amp=cfg.amp,
        guard=_guard_batch(data) if data.task == "image" else None,
    )
