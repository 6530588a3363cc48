"""Adversarial attacks in the input space every model takes: FGSM, PGD (L-inf, L2), on pixels or embeddings.

Attacks work in the space every image model takes: pixels in [0, 1] (normalisation lives inside
the model), so an L-inf budget of 8/255 is 8 grey levels. The model takes {"pixel_values": x};
the caller chooses its mode (`model.eval()` to attack a trained model). An attack changes neither
the mode nor the parameters and leaves no gradients on them.

    x_adv = fgsm(model, x, y, 8/255)                                  # one signed-gradient step
    x_adv = pgd(model, x, y, 8/255, steps=20)                         # PGD-20, L-inf, random start
    x_adv = pgd(model, x, y, 0.5, norm="l2", random_start=False)      # L2

Adversarial training (train.adversarial) builds its training steps from these attacks.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from duoclass.errors import DuoclassError


log = logging.getLogger("duoclass")

Objective = Callable[[torch.Tensor], torch.Tensor]  # logits (B, C) -> the scalar an attack maximises



def pgd_step_size(eps: float, steps: int) -> float:
    """2.5 * eps / steps (Madry et al. 2018): enough to cross the eps-ball and come back within `steps` steps."""
    return 2.5 * eps / steps

@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The parameters need no gradient while an attack runs (faster, and nothing lands in .grad); restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)

def _cross_entropy(labels: torch.Tensor) -> Objective:
    return lambda logits: F.cross_entropy(logits.float(), labels)


def _per_example(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform point of the L-inf ball, or a point of the L2 ball (random direction, radius uniform in [0, eps])."""
    if norm == "linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
    delta = torch.empty_like(x).normal_(generator=generator)
    radius = torch.empty(x.shape[0], device=x.device).uniform_(0, 1, generator=generator) * eps
    delta = delta * _per_example(radius / delta.flatten(1).norm(dim=1), x)
    return (x + delta).clamp(0, 1)


def _ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float, alpha: float,
                 norm: str) -> torch.Tensor:
    """A step of size alpha up the gradient, then back into the eps ball around x and into [0, 1]."""
    if norm == "linf":
        delta = (x_adv + alpha * grad.sign() - x).clamp(-eps, eps)
    else:
        unit = grad / _per_example(grad.flatten(1).norm(dim=1) + 1e-10, x)
        delta = x_adv + alpha * unit - x
        delta = delta * _per_example(torch.clamp(eps / delta.flatten(1).norm(dim=1), max=1.0), x)
    return (x + delta).clamp(0, 1)


def _attack(model: nn.Module, x: torch.Tensor, objective: Objective, eps: float, steps: int, alpha: float,
            norm: str, start: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`steps` projected ascent steps on objective(model(x_adv)) from `start`; the gradient reaches only x_adv.

    scale multiplies the objective before the gradient (an fp16 loss scale, so small gradients do not
    flush to zero); the step direction does not depend on it.
    """
    x = x.detach()
    if eps == 0:
        return x.clone()
    x_adv = start.detach()
    with _frozen(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = objective(model({"pixel_values": x_adv}))
            (grad,) = torch.autograd.grad(loss * scale if scale != 1 else loss, x_adv)
            x_adv = _ascent_step(x_adv.detach(), torch.nan_to_num(grad.float()), x, eps, alpha, norm)
    return x_adv.detach()


def _check_norm(norm: str) -> None:
    if norm not in ("linf", "l2"):
        raise DuoclassError(f"norm: got {norm!r}; choose linf or l2")


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, random_start: bool = False,
         alpha: float | None = None) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015), L-inf: x + alpha * sign(grad of the cross-entropy).

    random_start: start from a uniform point of the eps ball, step alpha = 1.25 eps (Wong et al., 2020);
    else alpha = eps from x itself. The result stays within eps of x and within [0, 1].
    """
    alpha = alpha if alpha is not None else (1.25 * eps if random_start else eps)
    start = _random_start(x, eps, "linf") if random_start else x
    return _attack(model, x, _cross_entropy(y), eps, 1, alpha, "linf", start)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
        alpha: float | None = None, norm: str = "linf", random_start: bool = True) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy (Madry et al., 2018), L-inf or L2.

    alpha defaults to 2.5 * eps / steps; the result stays within the eps ball around x and within [0, 1].
    random_start: a uniform point of the L-inf ball, or a random direction at a uniform radius for L2.
    """
    _check_norm(norm)
    if steps < 1:
        raise DuoclassError(f"pgd: got steps={steps}; an attack needs at least one step")
    alpha = alpha if alpha is not None else pgd_step_size(eps, steps)
    start = _random_start(x, eps, norm) if random_start else x
    return _attack(model, x, _cross_entropy(y), eps, steps, alpha, norm, start)


# --- adversarial training: the step ------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel: attacks run on it, out of sight of DDP's reducer."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def input_embeddings(model: nn.Module, mode: str = "fgm") -> nn.Module:
    fn = getattr(model, "input_embeddings", None)
    if fn is None:
        raise DuoclassError(f"--adversarial {mode}: {type(model).__name__} has no input_embeddings() method, so there "
                            "is no embedding table to perturb; use a text model from `duoclass models` or --adversarial none")
    return fn()
