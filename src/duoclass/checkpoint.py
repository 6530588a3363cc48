"""Model folders and resumable training state, written atomically.

A model folder is self-describing and pickle-free:

    model.safetensors   the weights (normalisation constants included)
    config.json         architecture, class names in order, preprocessing, versions,
                        and the SHA-256 of every other file in the folder
    metrics.json        evaluation results (optional)
    tokenizer files     for text models

Loading checks every listed hash, so a truncated or tampered file is refused with a
clear message, and never executes code from the folder.

Training state (`RUN_DIR/state.pt`) holds model, optimizer, scheduler, scaler, RNG
states and counters. It is written with `torch.save` and read back with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import DuoclassError

FORMAT = "duoclass-model"
FORMAT_VERSION = 1


# --- atomic writes ------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write `path` via a temp file in the same folder, fsync, then rename over the target.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- model folders ------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from . import __version__

    out = {"duoclass": __version__, "torch": torch.__version__.split("+")[0]}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def save_model_folder(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete model folder. `config` must hold task, model, classes, preprocessing."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blobs: dict[str, bytes] = {"model.safetensors": st_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})}
    blobs.update(extra_files or {})
    hashes = {}
    for name, data in blobs.items():
        atomic_write_bytes(folder / name, data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, **config, "versions": versions(), "files": hashes}
    if metrics is not None:
        atomic_write_json(folder / "metrics.json", metrics)
    # config.json last: a folder whose config.json exists is complete.
    atomic_write_json(folder / "config.json", cfg)
    return folder


def read_model_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Validate a model folder and return (config, state_dict). Runs no code from the folder."""
    from safetensors.torch import load as st_load

    folder = Path(folder)
    cfg = read_model_config(folder)
    try:
        state = st_load((folder / "model.safetensors").read_bytes())
    except Exception as e:  # safetensors raises its own error types
        raise DuoclassError(f"{folder / 'model.safetensors'}: unreadable weights ({e}); copy the model folder again") from None
    return cfg, state


def read_model_config(folder: Path) -> dict[str, Any]:
    """Validate a model folder's config.json and the checksums of its files; return the config."""
    if not folder.is_dir():
        raise DuoclassError(f"{folder}: model folder not found; pass the folder written by `duoclass train` (RUN_DIR/model)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise DuoclassError(f"{cfg_path}: missing; {folder} is not a complete duoclass model folder (re-run training or copy the whole folder)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DuoclassError(f"{cfg_path}: not valid JSON ({e}); the file is damaged, copy the model folder again") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise DuoclassError(
            f"{cfg_path}: not a duoclass model config (no \"format\": \"{FORMAT}\"); "
            "pass the model folder written by `duoclass train` (RUN_DIR/model)"
        )
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise DuoclassError(
            f"{cfg_path}: written by a newer duoclass (format {cfg.get('format_version')}); upgrade duoclass to load it"
        )
    for key in ("task", "model", "classes", "preprocessing", "files"):
        if key not in cfg:
            raise DuoclassError(f"{cfg_path}: missing key {key!r}; the file is damaged, copy the model folder again")
    for key, kind in (("model", dict), ("classes", list), ("preprocessing", dict), ("files", dict)):
        if not isinstance(cfg[key], kind):
            raise DuoclassError(f"{cfg_path}: {key!r} should be a JSON {'object' if kind is dict else 'list'}; the file is damaged, copy the model folder again")
    for name, digest in cfg["files"].items():
        p = folder / name
        if not p.is_file():
            raise DuoclassError(f"{p}: missing from the model folder; copy the whole folder again")
        if sha256_file(p) != digest:
            raise DuoclassError(f"{p}: checksum mismatch (the file was modified or truncated); copy the model folder again")
    return cfg


# --- training state -----------------------------------------------------------------------
def save_state(path: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DuoclassError(f"{path}: no training state to resume from; was the run started with this --output?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DuoclassError(f"{path}: training state is unreadable ({e}); start a new run without --resume") from None
