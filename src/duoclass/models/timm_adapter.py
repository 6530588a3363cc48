"""Any timm model as `timm:<name>`, with optional pretrained weights from a local file or the hub cache."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from ..errors import DuoclassError
from . import ImageModel


def create_timm_model(
    name: str,
    num_classes: int,
    image_size: int = 224,
    dropout: float = 0.0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    pretrained: str | None = None,
    **_: Any,
) -> ImageModel:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise DuoclassError(f"unknown timm model {name!r}; {hint}see `duoclass models --timm PATTERN`")
    kw: dict[str, Any] = {"num_classes": num_classes, "drop_rate": dropout}
    if pretrained == "hub":
        try:
            net = timm.create_model(name, pretrained=True, **kw)
        except Exception as e:
            raise DuoclassError(
                f"timm:{name}: pretrained weights could not be loaded from the hub cache ({type(e).__name__}); "
                "this machine may be offline: download the weights elsewhere and pass --pretrained PATH/TO/weights.safetensors"
            ) from None
    else:
        net = timm.create_model(name, pretrained=False, **kw)
        if pretrained:
            _load_local(net, Path(pretrained), name)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = mean or list(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = std or list(cfg.get("std", (0.229, 0.224, 0.225)))
    return ImageModel(net, mean, std)


def _load_local(net: torch.nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise DuoclassError(f"{path}: pretrained weights file not found; pass an existing .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DuoclassError(f"{path}: cannot read weights ({e}); use a .safetensors or tensor-only .pth file") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    own = net.state_dict()
    # Keep matching tensors; the classifier head usually differs in size and is trained anew.
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(keep) < len(own) // 2:
        raise DuoclassError(
            f"{path}: only {len(keep)} of {len(own)} tensors match timm:{name}; are these weights for another architecture?"
        )
    net.load_state_dict(keep, strict=False)
