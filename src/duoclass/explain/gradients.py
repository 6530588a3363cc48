"""Gradient explanations of a torch model: Grad-CAM / Grad-CAM++ (the `grad-cam` library) for CNNs, and
integrated gradients (Captum) on pixels or on a transformer's input embeddings.

    maps = grad_cam(model, x, targets)                       # x (B, 3, S, S) in [0, 1] -> (B, S, S) in [0, 1]
    a, details = integrated_gradients_text(model, pre, text, target)   # one score per token, details["tokens"]

Integrated gradients attribute the target class's logit; their sum equals logit(x) - logit(baseline) up to the
integral's error (completeness, Sundararajan et al. 2017). The step count starts at `steps` and doubles (to
MAX_STEPS) until that error is under 5% of the difference; the steps used and the error are recorded. The steps
run in chunks of `chunk` (Captum's internal_batch_size), so memory is that of `chunk` forward passes.
This module imports torch, grad-cam and captum: import it only where a torch model is explained.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")

MAX_STEPS = 512
COMPLETENESS = 0.05  # the largest |sum - (f(x) - f(baseline))| / |f(x) - f(baseline)| accepted before more steps


class _PixelModel(nn.Module):
    """A duoclass image model with a tensor in: what grad-cam and Captum call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model({"pixel_values": x})


NOT_A_MAP = ("--method gradcam: the feature maps of {} are not image-shaped (a vision transformer?); "
             "use --method occlusion (any model) or --method ig")


def cam_layers(model: nn.Module, size: int | None = None) -> list[nn.Module]:
    """Where Grad-CAM reads activations. msresnet: the output of every stage, since its head pools and fuses all
    of them (the maps are averaged at input resolution); a timm CNN: its last feature stage. With `size`, a timm
    model is run once on a blank (1, 3, size, size) image to check that the stage gives a (B, C, H, W) map (a
    vision transformer's blocks give tokens, which Grad-CAM cannot place)."""
    from duoclass.models.msresnet import MSResNet

    net = getattr(model, "backbone", None)
    if isinstance(net, MSResNet):
        return list(net.stages)
    info = getattr(net, "feature_info", None)
    name = None
    if info is not None:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        name = last.get("module") if isinstance(last, dict) else None
    if not name:
        raise DuoclassError(f"--method gradcam: no convolutional feature map found in {type(net or model).__name__}; "
                            "use --method occlusion (any model) or --method ig")
    layer = net.get_submodule(name)
    if size is not None:
        shapes: list[int] = []
        hook = layer.register_forward_hook(lambda m, i, o: shapes.append(o.dim() if torch.is_tensor(o) else 0))
        try:
            with torch.no_grad():
                model({"pixel_values": torch.zeros(1, 3, size, size, device=next(model.parameters()).device)})
        finally:
            hook.remove()
        if shapes[-1:] != [4]:
            raise DuoclassError(NOT_A_MAP.format(type(net).__name__))
    return [layer]


def cam_description(model: nn.Module) -> str:
    """Where cam_layers reads, in words (recorded with each Grad-CAM explanation)."""
    from duoclass.models.msresnet import MSResNet

    return "every msresnet stage, averaged" if isinstance(getattr(model, "backbone", None), MSResNet) else "last feature stage"


def grad_cam(model: nn.Module, x: torch.Tensor, targets: Sequence[int], plus: bool = False) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) maps (B, S, S) in [0, 1] of the target classes, at the input's resolution."""
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise DuoclassError("--method gradcam needs the grad-cam package; install it with "
                            "`pip install duoclass[explain]`, or use --method occlusion") from None
    layers = cam_layers(model)
    cls = GradCAMPlusPlus if plus else GradCAM
    model.eval()
    try:
        with torch.enable_grad(), cls(model=_PixelModel(model), target_layers=layers) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    except ValueError as e:  # grad-cam's "Invalid grads shape" for token-shaped activations
        raise DuoclassError(NOT_A_MAP.format(type(getattr(model, "backbone", model)).__name__) + f" ({e})") from None
    if maps.ndim != 3 or maps.shape[1:] != tuple(x.shape[-2:]):
        raise DuoclassError(NOT_A_MAP.format(type(getattr(model, "backbone", model)).__name__))
    return np.nan_to_num(maps.astype(np.float32))


def _captum(what: str) -> Any:
    try:
        import captum.attr
    except ImportError:
        raise DuoclassError(f"--method ig ({what}) needs captum; install it with `pip install duoclass[explain]`, "
                            "or use --method occlusion") from None
    return captum.attr


def _until_complete(attribute: Any, steps: int, f_x: float, f_base: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run `attribute(n_steps)` with `steps`, doubling up to MAX_STEPS until the attributions sum to
    f_x - f_base within COMPLETENESS of it (or of 1e-6 when the two are equal)."""
    gap = f_x - f_base
    while True:
        attr = attribute(steps)
        total = float(attr.sum())
        error = abs(total - gap) / max(abs(gap), 1e-6)
        if error <= COMPLETENESS or steps >= MAX_STEPS:
            break
        steps *= 2
    if error > COMPLETENESS:
        log.warning("integrated gradients: after %d steps the attributions sum to %.4g, not f(x) - f(baseline) = %.4g "
                    "(%.1f%% off); recorded as incomplete", steps, total, gap, 100 * error)
    return attr, {"steps": steps, "output": "logit", "sum": total, "f_x": f_x, "f_baseline": f_base,
                  "completeness_error": error, "complete": error <= COMPLETENESS}


def integrated_gradients_image(model: nn.Module, x: torch.Tensor, target: int, steps: int = 32,
                               chunk: int = 32) -> tuple[np.ndarray, dict[str, Any]]:
    """Integrated gradients of one image (1, 3, S, S) from a black baseline: (S, S), summed over channels."""
    ig = _captum("images").IntegratedGradients(_PixelModel(model))
    base = torch.zeros_like(x)
    model.eval()
    with torch.no_grad():
        f = model({"pixel_values": torch.cat([x, base])})[:, target]
    attr, details = _until_complete(
        lambda n: ig.attribute(x, baselines=base, target=int(target), n_steps=n, internal_batch_size=chunk),
        steps, float(f[0]), float(f[1]))
    details["baseline"] = "black"
    return attr[0].sum(0).detach().cpu().numpy().astype(np.float32), details


def integrated_gradients_text(model: nn.Module, pre: Any, text: str, target: int, steps: int = 32,
                              chunk: int = 32) -> tuple[np.ndarray, dict[str, Any]]:
    """Integrated gradients of a transformer text model on its token embeddings, from a baseline that keeps the
    special tokens and replaces every other token by padding: one score per token (special tokens excluded).
    details: tokens, spans (character offsets in `text`), steps, the completeness error."""
    embeddings = getattr(model, "input_embeddings", None)
    if pre.kind != "hf" or embeddings is None:
        raise DuoclassError("--method ig: integrated gradients are for transformer text models (their token "
                            "embeddings); for tfidf-mlp and fasttext use --method occlusion")
    enc = pre.tokenizer.encode(text)
    special = np.asarray(enc.special_tokens_mask, dtype=bool)
    ids = torch.tensor([enc.ids], dtype=torch.long)
    base = ids.clone()
    base[0, torch.from_numpy(~special)] = pre.pad_id
    mask = torch.ones_like(ids)
    device = next(model.parameters()).device
    ids, base, mask = ids.to(device), base.to(device), mask.to(device)

    def forward(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return model({"input_ids": i, "attention_mask": m.expand(i.shape[0], -1)})

    lig = _captum("text").LayerIntegratedGradients(forward, embeddings())
    model.eval()
    with torch.no_grad():
        f = forward(torch.cat([ids, base]), mask)[:, target]
    attr, details = _until_complete(
        lambda n: lig.attribute(ids, baselines=base, target=int(target), additional_forward_args=(mask,),
                                n_steps=n, internal_batch_size=chunk),
        steps, float(f[0]), float(f[1]))
    scores = attr[0].sum(-1).detach().cpu().numpy().astype(np.float32)  # (L,): summed over the embedding dimension
    keep = [i for i in range(len(enc.ids)) if not special[i]]
    details.update(baseline="special tokens kept, the others padding", unit="token",
                   tokens=[enc.tokens[i] for i in keep], spans=[tuple(enc.offsets[i]) for i in keep])
    return scores[keep], details
