"""duoclass: train, evaluate, harden and serve image and text classifiers with one engine."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import Classifier, load, train
from .config import TrainConfig
from .data.clean import clean
from .errors import DuoclassError, NotFittedError
from .models import create_model, register

__all__ = [
    "train",
    "load",
    "Classifier",
    "TrainConfig",
    "clean",
    "create_model",
    "register",
    "DuoclassError",
    "NotFittedError",
    "__version__",
]
