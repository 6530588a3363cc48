"""Hyper-parameter search with Optuna over the shared engine (`pip install duoclass[tune]`).

    duoclass tune DATA --trials 20 --epochs 5 --study-dir runs/tune [train flags...]
    duoclass train --config runs/tune/best.yaml --epochs 30          # the winner, trained longer

CPU example:  duoclass tune ../shared/data/text/trec6 --model fasttext --trials 6 --epochs 3 --device cpu

Searched, unless given as a flag (a flag given on the command line or in --config fixes it):

    lr               log-uniform, 1/10x to 10x the model's recommended rate (models.default_lr)
    batch_size       16, 32, 64 or 128
    weight_decay     uniform in [0, 0.1]
    label_smoothing  uniform in [0, 0.2]
    max_length       64, 128 or 256 (text only; --image-size is never searched)

Each trial is one `engine.fit` run in STUDY_DIR/trial-N, scored by the valid --select-metric of
its best epoch. After every epoch the valid metric goes to Optuna, and MedianPruner stops a trial
whose metric is below the median of earlier trials at the same epoch (from the 4th trial on, from
epoch 1 on). The TPE sampler is seeded with --seed, and every trial trains with the same --seed.

The study lives in STUDY_DIR/study.db (SQLite): `tune` with the same --study-dir adds --trials
more trials to it. At the end STUDY_DIR/best.yaml holds the data, the model, the fixed flags and
the best parameters in the format `duoclass train --config` reads, and STUDY_DIR/summary.json
(also printed) the best value and parameters and the count of complete, pruned and failed trials.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from duoclass.settings.config import TrainConfig
from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")

BATCH_SIZES = [16, 32, 64, 128]
MAX_LENGTHS = [64, 128, 256]
NOT_FIXABLE = {"data", "output", "resume"}  # never copied into best.yaml as fixed flags


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise DuoclassError("tune needs the optuna package; install it with `pip install duoclass[tune]`") from None
    return optuna


def default_pruner() -> Any:
    """Median pruning after 3 complete trials, from the first epoch on (epochs are the steps)."""
    return _optuna().pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


def search_space(cfg: TrainConfig, fixed: set[str]) -> dict[str, tuple]:
    """The searched settings, minus the fixed flags: name -> ("float", low, high, log) or ("choice", options)."""
    from duoclass.models import default_lr

    lr0 = default_lr(cfg.model)
    space: dict[str, tuple] = {
        "lr": ("float", lr0 / 10, lr0 * 10, True),
        "batch_size": ("choice", BATCH_SIZES),
        "weight_decay": ("float", 0.0, 0.1, False),
        "label_smoothing": ("float", 0.0, 0.2, False),
    }
    if cfg.task == "text":
        space["max_length"] = ("choice", MAX_LENGTHS)
    return {k: v for k, v in space.items() if k not in fixed}


def suggest(trial: Any, cfg: TrainConfig, fixed: set[str]) -> dict[str, Any]:
    """The settings a trial changes: the search space minus the fixed flags."""
    return {name: trial.suggest_float(name, d[1], d[2], log=d[3]) if d[0] == "float"
            else trial.suggest_categorical(name, d[1]) for name, d in search_space(cfg, fixed).items()}


def starting_point(cfg: TrainConfig, fixed: set[str]) -> dict[str, Any]:
    """The run's own settings (defaults plus the user's flags) that lie in the search space, for the first trial."""
    point: dict[str, Any] = {}
    for name, d in search_space(cfg, fixed).items():
        value = getattr(cfg, name)
        if value is not None and (d[1] <= value <= d[2] if d[0] == "float" else value in d[1]):
            point[name] = value
    return point


def changed_settings(cfg: TrainConfig) -> set[str]:
    """Names of the settings that differ from TrainConfig's defaults (the Python API's fixed flags)."""
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != f.default}


def tune(config: TrainConfig, trials: int, study_dir: str | Path = "runs/tune", timeout: float | None = None,
         fixed: Iterable[str] | None = None, pruner: Any = None) -> dict[str, Any]:
    """Run `trials` more trials of the study in `study_dir`; write best.yaml and summary.json; return the summary.

    fixed: settings the user chose (not searched, copied into best.yaml); default: those that
    differ from TrainConfig's defaults. pruner: an Optuna pruner (default: `default_pruner()`).
    """
    from duoclass.training.run import prepare, resolve, run
    from duoclass.report.metrics import HIGHER_IS_BETTER

    optuna = _optuna()
    if trials < 1:
        raise DuoclassError(f"--trials: got {trials}; run at least one trial, e.g. --trials 20")
    if timeout is not None and timeout <= 0:
        raise DuoclassError(f"--timeout: got {timeout}; give the time budget in seconds, e.g. --timeout 3600")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DuoclassError("tune runs its trials in one process; launch it without torchrun")
    if not config.data:
        raise DuoclassError("tune: no DATA given; pass a dataset folder, zip or CSV")
    fixed = set(changed_settings(config) if fixed is None else fixed) - NOT_FIXABLE
    base = resolve(dataclasses.replace(config, resume=None, output=str(study_dir)))  # trials write to trial-N
    metric = base.select_metric
    direction = "maximize" if HIGHER_IS_BETTER.get(metric, True) else "minimize"

    root = Path(study_dir)
    study = _open_study(optuna, root, base, fixed, metric, direction, pruner)

    prepared: dict[Any, Any] = {}  # datasets depend only on max_length among the searched settings

    def objective(trial: Any) -> float:
        params = suggest(trial, base, fixed)
        cfg = dataclasses.replace(base, **params, output=str(root / f"trial-{trial.number}"))
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in params.items()))
        key = cfg.max_length if cfg.task == "text" else None
        if key not in prepared:
            prepared[key] = prepare(cfg)
        data = prepared[key]
        if hasattr(data.collate, "dropped"):
            data.collate.dropped = 0  # per-run count of unusable examples

        def report(epoch: int, valid: dict[str, Any]) -> None:
            trial.report(valid[metric], epoch)
            if trial.should_prune():
                log.info("trial %d pruned after epoch %d (valid %s %.4f)", trial.number, epoch, metric, valid[metric])
                raise optuna.TrialPruned(f"valid {metric} {valid[metric]:.4f} after epoch {epoch}")

        # the settings' step (--adversarial) in every trial; no trial looks at the test split, so none can be
        # chosen by it (train the winner with `duoclass train --config best.yaml` for its test figures)
        try:
            result = run(cfg, data=dataclasses.replace(data, test=None), on_epoch=report)
        finally:  # a trial is never resumed (the study goes on instead): its training state is only disk
            (Path(cfg.output) / "state.pt").unlink(missing_ok=True)
        trial.set_user_attr("run_dir", cfg.output)
        return float(result.valid[metric])

    study.optimize(objective, n_trials=trials, timeout=timeout)
    return _write_best(study, root, base, fixed, metric, direction)


def _open_study(optuna: Any, root: Path, base: TrainConfig, fixed: set[str], metric: str, direction: str,
                pruner: Any) -> Any:
    """The study in root/study.db (created, or resumed with a warning when its data or metric changed)."""
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # duoclass logs each trial itself
    study = optuna.create_study(storage=f"sqlite:///{(root / 'study.db').resolve()}", study_name="duoclass",
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise DuoclassError(f"{root / 'study.db'}: the study {study.direction.name.lower()}s its metric, but "
                            f"--select-metric {metric} needs {direction}; use another --study-dir")
    previous = study.user_attrs.get("data")
    if previous is None:
        study.set_user_attr("data", base.data)
        study.set_user_attr("select_metric", metric)
    elif previous != base.data or study.user_attrs.get("select_metric") != metric:
        log.warning("%s: the study was started on %s (%s); now %s (%s): its trials are not comparable",
                    root / "study.db", previous, study.user_attrs.get("select_metric"), base.data, metric)
    if not study.trials:
        # The first trial of a new study runs the settings as given, so the best found is never worse on
        # valid than not tuning at all.
        study.enqueue_trial(starting_point(base, fixed))
    # Seeded by --seed and the trials so far, so a resumed study does not repeat its first suggestions.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
    study.pruner = pruner if pruner is not None else default_pruner()
    return study


def _write_best(study: Any, root: Path, base: TrainConfig, fixed: set[str], metric: str, direction: str) -> dict[str, Any]:
    """best.yaml (a file `train --config` accepts) and summary.json of the study; returns the summary."""
    import optuna

    from duoclass.artifacts.atomic import atomic_write_json, atomic_write_text

    states = optuna.trial.TrialState
    count = {name: sum(t.state == getattr(states, name.upper()) for t in study.trials)
             for name in ("complete", "pruned", "fail")}
    if not count["complete"]:
        raise DuoclassError(f"{root}: no trial has completed ({count['pruned']} pruned, {count['fail']} failed); "
                            "run more --trials or a longer --timeout")
    best = study.best_trial
    best_yaml = root / "best.yaml"
    settings = {"data": base.data, "model": base.model}
    settings.update({f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if f.name in fixed})
    settings.update(best.params)
    settings.update(epochs=base.epochs, output=str(root / "best"))
    TrainConfig(**settings)  # the file must be one `train --config` accepts
    atomic_write_text(best_yaml, f"# duoclass tune: best of {count['complete']} complete trials (trial {best.number}, "
                      f"valid {metric} {best.value:.4f})\n# train it: duoclass train --config {best_yaml}  "
                      "(add --epochs N to train longer)\n" + yaml.safe_dump(settings, sort_keys=False))
    summary = {
        "study_dir": str(root), "metric": metric, "direction": direction, "best_value": best.value,
        "best_params": best.params, "best_trial": best.number, "best_run": best.user_attrs.get("run_dir"),
        "best_config": str(best_yaml), "trials": {"complete": count["complete"], "pruned": count["pruned"],
                                                  "failed": count["fail"], "total": len(study.trials)},
    }
    atomic_write_json(root / "summary.json", summary)
    log.info("best trial %d: valid %s %.4f; train it with `duoclass train --config %s`", best.number, metric, best.value, best_yaml)
    return summary
