"""Backends run a model: a dict of numpy arrays in (what a preprocessor's `collate` makes), logits out.

    backend = TorchBackend(model, device)                 # torch eager, inference mode
    logits = backend.run({"pixel_values": x})            # float32 numpy (B, C)

Everything above a backend (the predict path in predict.py, evaluation, the CSV writer, a
server) works on numpy arrays and never touches torch, so another runtime can take the
backend's place. Torch eager is the first backend; `backend_names()` lists those available.
This module imports torch: import it only where a model is actually run.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from duoclass.errors import DuoclassError

BACKENDS = ("torch",)


class Backend(Protocol):
    """What the predict path needs of a model runtime."""

    name: str

    def run(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Logits, float32 (B, C), for one batch of model inputs (numpy arrays or tensors)."""
        ...


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
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise DuoclassError(f"--device: got {name!r}; choose one of: auto, cpu, cuda, mps")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 (or fp16) autocast on CUDA when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy arrays or tensors -> tensors on `device` (numpy arrays are shared, not copied, on the CPU)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        out[k] = t.to(device, non_blocking=True)
    return out


class TorchBackend:
    """A torch module in eval and inference mode, optionally under autocast on CUDA."""

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", amp: bool = False):
        self.device = torch.device(device) if isinstance(device, str) else device
        self.model = model
        self.amp = amp

    def __repr__(self) -> str:
        return f"TorchBackend(device={str(self.device)!r})"

    def run(self, inputs: Mapping[str, Any]) -> np.ndarray:
        self.model.eval()
        with torch.inference_mode(), autocast(self.device, self.amp):
            logits = self.model(to_device(inputs, self.device))
        return logits.float().cpu().numpy()


def torch_backend_from_folder(config: dict[str, Any], state: dict[str, torch.Tensor], folder: Any,
                              device: str = "auto") -> TorchBackend:
    """Build the architecture a model folder's config names and load its weights (strictly)."""
    from duoclass.models import create_model

    dev = pick_device(device)
    model = create_model(config["model"]["name"], len(config["classes"]), **config["model"].get("args", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise DuoclassError(f"{folder}/model.safetensors: weights do not fit the architecture in config.json ({first})") from None
    model.to(dev).eval()
    return TorchBackend(model, dev)


def backend_names() -> tuple[str, ...]:
    return BACKENDS
