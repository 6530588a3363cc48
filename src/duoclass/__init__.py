"""duoclass: train, evaluate, harden and serve image and text classifiers with one engine.

    import duoclass
    clf = duoclass.train("data/xrays", epochs=10, output="runs/xray")
    clf = duoclass.load("runs/xray/model")
    clf(["a.png", "b.png"])               # [{"label": ..., "score": ...}, {...}]
    duoclass.export("runs/xray/model")    # also quantize, prune, tune, pretrain: the commands, in Python

The names below are imported on first use, so `import duoclass` (and `duoclass --help`)
does not import torch; loading a model and running it with the torch backend does.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "duoclass.api",
    "load": "duoclass.api",
    "export": "duoclass.api",
    "quantize": "duoclass.api",
    "prune": "duoclass.api",
    "tune": "duoclass.api",
    "pretrain": "duoclass.api",
    "Classifier": "duoclass.infer.classifier",
    "Prediction": "duoclass.infer.predict",
    "TrainConfig": "duoclass.settings.config",
    "PretrainConfig": "duoclass.settings.config",
    "clean": "duoclass.data.clean",
    "create_model": "duoclass.models",
    "register": "duoclass.models.base",
    "DuoclassError": "duoclass.errors",
    "NotFittedError": "duoclass.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'duoclass' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
