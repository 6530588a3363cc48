"""Repeated runs: K-fold cross-validation (--folds K) and repeats over seeds (--seeds 0,1,2).

    summary = run_repeats(resolve(cfg))      # one run folder per fold or seed, then OUTPUT/summary.json

Each run is an ordinary `duoclass train` run into OUTPUT/fold-N or OUTPUT/seed-N; a run whose folder already
holds its metrics.json is read, not trained again, so an interrupted cross-validation resumes where it stopped.
The summary gives each run's valid and test figures, their mean and standard deviation, and the model a user would
keep: the run with the best valid score (the run's --select-metric), said which, with its test figures. The test
split plays no part in that choice.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from duoclass.artifacts.atomic import atomic_write_json
from duoclass.settings.config import TrainConfig

log = logging.getLogger("duoclass")
SHOWN = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc")  # the table's columns, valid and test


def plan(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, settings) of each run."""
    out = Path(cfg.output)
    if cfg.folds:
        return [(f"fold-{k}", dataclasses.replace(cfg, fold=k, output=str(out / f"fold-{k}"))) for k in range(cfg.folds)]
    seeds = [int(x) for x in (cfg.seeds or "").split(",") if x.strip()]
    return [(f"seed-{s}", dataclasses.replace(cfg, seed=s, seeds=None, output=str(out / f"seed-{s}"))) for s in seeds]


def _figures(split: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    if not split:
        return {}
    out = {k: split.get(k) for k in (*SHOWN, metric)}
    if "calibration" in split:
        out["ece"] = split["calibration"].get("ece")
    return out


def _stats(rows: list[dict[str, Any]], split: str) -> dict[str, dict[str, float]]:
    out = {}
    for k in rows[0].get(split, {}):
        vals = [r[split][k] for r in rows if isinstance(r.get(split, {}).get(k), (int, float))]
        if len(vals) == len(rows):
            out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def run_repeats(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or read) every run of the plan and write OUTPUT/summary.json; returns the summary."""
    from duoclass.report.metrics import HIGHER_IS_BETTER
    from duoclass.training.run import run

    metric = cfg.select_metric
    rows, t0 = [], time.time()
    for name, sub in plan(cfg):
        done = Path(sub.output) / "metrics.json"
        if done.is_file() and not sub.overwrite:
            log.info("%s: done earlier (%s), read, not trained again", name, done)
            m = json.loads(done.read_text())
        else:
            log.info("%s: training into %s", name, sub.output)
            result = run(sub)
            if result is None:  # a non-zero rank under torchrun
                continue
            m = json.loads((result.run_dir / "metrics.json").read_text())
        rows.append({"run": name, "run_dir": sub.output, "model_dir": m.get("model_dir"), "seconds": m.get("seconds"),
                     "valid": _figures(m.get("valid"), metric), "test": _figures(m.get("test"), metric)})
    higher = HIGHER_IS_BETTER.get(metric, True)
    kept = (max if higher else min)(rows, key=lambda r: r["valid"].get(metric, float("-inf") if higher else float("inf")))
    summary = {"kind": "cross-validation" if cfg.folds else "seeds", "folds": cfg.folds or None,
               "seeds": cfg.seeds, "select_metric": metric, "runs": rows,
               "valid": _stats(rows, "valid"), "test": _stats(rows, "test"),
               "kept": {"run": kept["run"], "model_dir": kept["model_dir"],
                        "why": f"the best valid {metric} of the {len(rows)} runs (the test split played no part)",
                        "test": kept["test"]},
               "seconds": round(time.time() - t0, 1),
               "run_seconds": round(sum(r["seconds"] or 0 for r in rows), 1)}
    atomic_write_json(Path(cfg.output) / "summary.json", summary)
    return summary


def summary_table(s: dict[str, Any]) -> str:
    """The printed table: one row per run, then mean ± std, then the kept model."""
    cols = [c for c in SHOWN if any(r["test"].get(c) is not None or r["valid"].get(c) is not None for r in s["runs"])]
    head = f"{'run':<10}" + "".join(f"  {'valid ' + c:>24}" for c in cols[:2]) + "".join(f"  {'test ' + c:>22}" for c in cols)
    lines = [head]

    def cell(v: Any, w: int) -> str:
        return f"  {v:>{w}.4f}" if isinstance(v, (int, float)) else f"  {'-':>{w}}"

    for r in s["runs"]:
        lines.append(f"{r['run']:<10}" + "".join(cell(r["valid"].get(c), 24) for c in cols[:2])
                     + "".join(cell(r["test"].get(c), 22) for c in cols))

    def ms(split: str, c: str, w: int) -> str:
        st = s[split].get(c)
        text = "%.4f ± %.4f" % (st["mean"], st["std"]) if st else "-"
        return f"  {text:>{w}}"

    lines.append(f"{'mean ± std':<10}" + "".join(ms("valid", c, 24) for c in cols[:2]) + "".join(ms("test", c, 22) for c in cols))
    k = s["kept"]
    lines.append(f"kept: {k['run']} ({k['model_dir']}): {k['why']}; its test: "
                 + ", ".join(f"{c} {k['test'][c]:.4f}" for c in cols if isinstance(k["test"].get(c), (int, float))))
    lines.append(f"{len(s['runs'])} runs, {s['seconds']:.0f} s in all")
    return "\n".join(lines)
