"""Any timm model as `timm:<name>`, with optional pretrained weights from a local file or the hub cache.

`--pretrained hub` downloads through the Hugging Face hub when it is reachable. Offline
(HF_HUB_OFFLINE set, or the hub's host does not resolve) the weights are taken from the
local cache without touching the network, and a model whose weights are not cached fails at
once with a clear message instead of after the hub client's minute of retries.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from duoclass.errors import DuoclassError
from duoclass.preprocess.image import IMAGENET_MEAN, IMAGENET_STD
from duoclass.models.base import ImageModel


def create_timm_model(
    name: str,
    num_classes: int,
    image_size: int = 224,
    dropout: float = 0.0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    pretrained: str | None = None,
) -> ImageModel:
    """timm model `name` behind the dict contract. `image_size` is accepted for the common image-builder
    signature; timm models adapt to the input size themselves."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise DuoclassError(f"unknown timm model {name!r}; {hint}see `duoclass models --timm PATTERN`")
    kw: dict[str, Any] = {"num_classes": num_classes, "drop_rate": dropout}
    if pretrained == "hub":
        cached = check_hub_weights(name)
        if cached is not None:  # offline: load the cached file, never the network
            kw["pretrained_cfg_overlay"] = {"file": cached}
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
    mean = mean or list(cfg.get("mean", IMAGENET_MEAN))
    std = std or list(cfg.get("std", IMAGENET_STD))
    return ImageModel(net, mean, std)


def _cached_weights(name: str) -> str | None:
    """The locally cached hub weights of timm model `name` (Hugging Face cache, or torch hub's for URL weights)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if p.is_file():
            return str(p)
    return None


def check_hub_weights(name: str) -> str | None:
    """For `--pretrained hub`: None when the hub is reachable (timm downloads or uses its cache); offline, the
    cached weights file, or a DuoclassError at once when there is none (no network is tried)."""
    from duoclass.models.text_models import _hub_reachable

    if _hub_reachable():
        return None
    cached = _cached_weights(name)
    if cached is None:
        raise DuoclassError(
            f"timm:{name}: --pretrained hub needs the weights from the Hugging Face hub, which is not reachable from "
            "here (HF_HUB_OFFLINE is set or the host does not resolve), and they are not in the local cache; "
            "download them elsewhere and pass --pretrained PATH/TO/weights.safetensors, or train without --pretrained"
        )
    return cached


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
