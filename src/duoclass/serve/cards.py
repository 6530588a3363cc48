"""Model names and model cards: what `/v1/models` says about each folder (task, classes, test metrics, plots).
"""
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")
PLOTS = ("confusion_matrix", "curves", "reliability", "roc_pr")  # PNGs `duoclass train` writes into the run folder
MAX_PLOT_BYTES = 20 * 1024 * 1024
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# --- model folders -----------------------------------------------------------------------------
def parse_model_args(model_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """{name: folder} from "DIR" or "NAME=DIR" arguments. A folder called `model` (what `duoclass train`
    writes inside its run folder) is named after the run folder; a duplicate name is an error."""
    pairs: list[tuple[str, Path, str]] = []
    if isinstance(model_dirs, Mapping):
        pairs = [(str(k), Path(v), f"{k}={v}") for k, v in model_dirs.items()]
    else:
        for arg in model_dirs:
            text = os.fspath(arg)
            name, eq, rest = text.partition("=")
            if eq and NAME.fullmatch(name) and not Path(text).exists():
                pairs.append((name, Path(rest), text))
            else:
                p = Path(text)
                q = p.resolve()
                auto = q.parent.name if q.name == "model" and q.parent.name else q.name
                pairs.append((auto, p, text))
    if not pairs:
        raise DuoclassError("serve: no MODEL_DIR given; pass one or more model folders, e.g. runs/x/model")
    out: dict[str, Path] = {}
    for name, folder, arg in pairs:
        if not NAME.fullmatch(name):
            raise DuoclassError(f"{arg}: {name!r} cannot be a model name (letters, digits, '.', '_', '-'; at most 64); "
                                f"name it with NAME=DIR, e.g. digits={folder}")
        if name in out:
            raise DuoclassError(f"{arg}: a second model named {name!r} (the first is {out[name]}); "
                                f"name them with NAME=DIR, e.g. {name}-2={folder}")
        if not (folder / "config.json").is_file():
            raise DuoclassError(f"{folder}: not a model folder (no config.json); pass RUN_DIR/model as `duoclass train` "
                                "writes it")
        out[name] = folder
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _scalars(split: Any) -> dict[str, float]:
    """The plain numbers of one split's metrics (accuracy, f1_macro, ...; not per_class or the matrix)."""
    if not isinstance(split, dict):
        return {}
    return {k: v for k, v in split.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def model_card(name: str, clf: Any, folder: Path, backend: str,
               abstain_below: float | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(what GET /v1/models/{name} answers, the plot PNGs). metrics.json comes from the model folder (hashed
    with the weights) or else the run folder; plots from the model folder or the run folder beside it."""
    cfg = clf.config_
    metrics = _read_json(folder / "metrics.json")
    run = folder.parent if (folder.parent / "metrics.json").is_file() else None
    if not isinstance(metrics, dict) and run is not None:
        metrics = _read_json(run / "metrics.json")
    metrics = metrics if isinstance(metrics, dict) else {}
    plots: dict[str, bytes] = {}
    for plot in PLOTS:
        for where in [folder] + ([run] if run is not None else []):
            p = where / f"{plot}.png"
            try:
                if p.is_file() and p.stat().st_size <= MAX_PLOT_BYTES:
                    data = p.read_bytes()
                    if data.startswith(b"\x89PNG\r\n\x1a\n"):
                        plots[plot] = data
                        break
            except OSError:
                pass
    card = {
        "name": name,
        "task": clf.task,
        "model": cfg.get("model", {}).get("name"),
        "classes": clf.classes_.tolist(),
        "backend": backend,
        "preprocessing": cfg.get("preprocessing", {}),
        "evaluation": cfg.get("evaluation", {}),
        "metrics": {s: _scalars(metrics.get(s)) for s in ("valid", "test") if isinstance(metrics.get(s), dict)},
        "epoch": metrics.get("epoch", metrics.get("best_epoch")),
        "intervals": {s: {k: v for k, v in metrics[s]["intervals"].items() if k != "method"}
                      for s in ("valid", "test") if isinstance(metrics.get(s), dict)
                      and isinstance(metrics[s].get("intervals"), dict)},
        "calibration": {"temperature": clf.temperature,
                        "ece": {s: metrics[s]["calibration"].get("ece") for s in ("valid", "test")
                                if isinstance(metrics.get(s), dict) and isinstance(metrics[s].get("calibration"), dict)}},
        "conformal": ({k: clf.conformal[k] for k in ("alpha", "score")} if clf.conformal else None),
        "abstain_below": abstain_below,
        "operating_point": cfg.get("operating_point"),
        "plots": {p: (f"/v1/models/{name}/{p}.png" if p in plots else None) for p in PLOTS},
        "predict": f"/v1/models/{name}/predict",
    }
    full = dict(card, per_class={s: metrics[s].get("per_class") for s in ("valid", "test")
                                 if isinstance(metrics.get(s), dict) and isinstance(metrics[s].get("per_class"), dict)})
    return full, plots
