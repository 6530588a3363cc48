"""Training state (`RUN_DIR/state.pt`): model, optimizer, scheduler, scaler, RNG states and counters.

Written with `torch.save` through an atomic write and read back with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers, whatever torch's default.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from duoclass.errors import DuoclassError
from duoclass.artifacts.atomic import atomic_write_bytes


log = logging.getLogger("duoclass")


# --- training state -----------------------------------------------------------------------
def save_state(path: str | Path, state: dict[str, Any]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise DuoclassError(f"{path}: no training state to resume from; was the run started with this --output?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DuoclassError(f"{path}: training state is unreadable ({str(e).splitlines()[0]}); start a new run without --resume") from None
