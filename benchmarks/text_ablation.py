"""Text ablations: augmentation on small data, attention vs cls pooling, and Optuna tuning vs defaults.

  augment  a 500-row stratified training subsample (seed 0) of trec6 (English) and
           chnsenticorp_htl (Chinese); `duoclass train --model M --text-augment none` vs
           `--text-augment default` (EDA on words / characters, embedding neighbours),
           seeds 0 1 2: mean ± std test accuracy and the difference of the means
  pooling  trec6 with albert-scratch-tiny, `--pooling cls` vs `--pooling attention`,
           seeds 0 1 2 (--pool-seeds 0 for one seed)
  tune     `duoclass tune trec6 --model fasttext --trials 10 --epochs 5`, then
           `duoclass train --config STUDY/best.yaml` vs `duoclass train trec6 --model fasttext --epochs 5`
           (defaults), test accuracy of both; one seed (0)

Valid and test splits are always whole. Run folders go to runs/bench/text_ablation/ (git-ignored).

Full run (about 20-25 minutes on 2 busy CPU cores: augment ~5, pooling ~10, tune ~7):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/text_ablation.py

Quick check:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/text_ablation.py --aug-size 200 \
        --subsample 200 --epochs 1 --seeds 0 1 --trials 2 --out benchmarks/results/text_ablation_tiny.json

Writes benchmarks/results/text_ablation.json (or --out).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from bench_common import (DEFAULT_DATA, RESULTS, RUNS, dataset_dir, environment, last_json, mean_std, prepared_dataset,
                          read_rows, run_cli, run_metrics, write_result)

ROOT = RUNS / "text_ablation"
COMMON = ["--no-progress", "--no-tensorboard"]


def train(data: Path, out: Path, args: list[Any]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    wall, _ = run_cli(["train", data, *args, "--output", out, *COMMON], out.with_suffix(".log"))
    return {**run_metrics(out), "seconds": round(wall, 1)}


def compare(name: str, data: Path, arms: dict[str, list[Any]], seeds: list[int], runs: Path) -> dict[str, Any]:
    """Each arm (extra train flags) over the seeds; mean ± std test accuracy per arm."""
    res: dict[str, Any] = {"data": str(data), "train_rows": len(read_rows(data / "train.csv")[1]), "arms": {}}
    for arm, args in arms.items():
        rows = []
        for seed in seeds:
            r = train(data, runs / f"{name}-{arm}-seed{seed}", [*args, "--seed", seed])
            rows.append({"seed": seed, **r})
            print(f"    {name} {arm} seed {seed}: test accuracy {r['test_accuracy']:.4f} ({r['seconds']} s)", flush=True)
        res["arms"][arm] = {"args": [str(x) for x in args], "runs": rows,
                            "test_accuracy": mean_std([r["test_accuracy"] for r in rows]),
                            "seconds": mean_std([r["seconds"] for r in rows])}
    return res


def part_augment(a: argparse.Namespace) -> dict[str, Any]:
    epochs = a.epochs or a.aug_epochs
    shutil.rmtree(ROOT / "augment", ignore_errors=True)  # no run folders of earlier invocations
    out: dict[str, Any] = {"model": a.aug_model, "train_rows": a.aug_size, "epochs": epochs, "seeds": a.seeds, "datasets": {}}
    for name in a.aug_datasets:
        data = prepared_dataset(dataset_dir(a.data_root, name), ROOT / "data", a.aug_size)
        print(f"== augment: {name} ({a.aug_size} training rows, {a.aug_model})", flush=True)
        base = ["--model", a.aug_model, "--epochs", epochs]
        r = compare(name, data, {"none": [*base, "--text-augment", "none"], "default": [*base, "--text-augment", "default"]},
                    a.seeds, ROOT / "augment")
        r["delta_mean"] = r["arms"]["default"]["test_accuracy"]["mean"] - r["arms"]["none"]["test_accuracy"]["mean"]
        out["datasets"][name] = r
    return out


def part_pooling(a: argparse.Namespace) -> dict[str, Any]:
    epochs = a.epochs or a.pool_epochs
    data = prepared_dataset(dataset_dir(a.data_root, a.pool_dataset), ROOT / "data", a.subsample)
    shutil.rmtree(ROOT / "pooling", ignore_errors=True)
    print(f"== pooling: {a.pool_dataset} ({a.pool_model}, {epochs} epochs)", flush=True)
    base = ["--model", a.pool_model, "--epochs", epochs]
    r = compare(a.pool_dataset, data, {"cls": [*base, "--pooling", "cls"], "attention": [*base, "--pooling", "attention"]},
                a.pool_seeds, ROOT / "pooling")
    r["delta_mean"] = r["arms"]["attention"]["test_accuracy"]["mean"] - r["arms"]["cls"]["test_accuracy"]["mean"]
    return {"model": a.pool_model, "epochs": epochs, "seeds": a.pool_seeds, **r}


def part_tune(a: argparse.Namespace) -> dict[str, Any]:
    epochs = a.epochs or a.tune_epochs
    data = prepared_dataset(dataset_dir(a.data_root, a.tune_dataset), ROOT / "data", a.subsample)
    runs = ROOT / "tune"
    study = runs / "study"
    shutil.rmtree(runs, ignore_errors=True)  # a fresh study: `tune` adds to an existing one
    print(f"== tune: {a.tune_dataset} ({a.tune_model}, {a.trials} trials x {epochs} epochs)", flush=True)
    base = ["--model", a.tune_model, "--epochs", epochs, "--seed", 0]
    wall, stdout = run_cli(["tune", data, "--trials", a.trials, "--study-dir", study, *base, *COMMON], runs / "tune.log")
    summary = last_json(stdout)
    shutil.rmtree(runs / "best", ignore_errors=True)
    t_wall, _ = run_cli(["train", "--config", study / "best.yaml", "--output", runs / "best", *COMMON], runs / "best.log")
    tuned = {**run_metrics(runs / "best"), "seconds": round(t_wall, 1)}
    default = train(data, runs / "default", base)
    print(f"    tuned   test accuracy {tuned['test_accuracy']:.4f}   default test accuracy {default['test_accuracy']:.4f}", flush=True)
    return {"data": str(data), "model": a.tune_model, "epochs": epochs, "trials": summary["trials"],
            "metric": summary["metric"], "best_valid": summary["best_value"], "best_params": summary["best_params"],
            "tune_seconds": round(wall, 1), "tuned": tuned, "default": default,
            "delta": tuned["test_accuracy"] - default["test_accuracy"]}


def fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["augment", "pooling", "tune"], choices=["augment", "pooling", "tune"])
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding the dataset folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the augmentation comparison")
    p.add_argument("--epochs", type=int, default=0, help="if > 0, overrides --aug-epochs, --pool-epochs and --tune-epochs")
    p.add_argument("--subsample", type=int, default=0, help="pooling and tune parts: use only N training rows; 0 = all")
    p.add_argument("--aug-datasets", nargs="+", default=["trec6", "chnsenticorp_htl"])
    p.add_argument("--aug-size", type=int, default=500, help="training rows of the augmentation comparison")
    p.add_argument("--aug-model", default="fasttext", choices=["fasttext", "albert-scratch-tiny"])
    p.add_argument("--aug-epochs", type=int, default=20)
    p.add_argument("--pool-dataset", default="trec6")
    p.add_argument("--pool-model", default="albert-scratch-tiny", choices=["albert-scratch-tiny", "albert-scratch-small", "fasttext"])
    p.add_argument("--pool-epochs", type=int, default=8)
    p.add_argument("--pool-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tune-dataset", default="trec6")
    p.add_argument("--tune-model", default="fasttext")
    p.add_argument("--tune-epochs", type=int, default=5)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS / "text_ablation.json"))
    a = p.parse_args()

    for name in {*(a.aug_datasets if "augment" in a.parts else []), *([a.pool_dataset] if "pooling" in a.parts else []),
                 *([a.tune_dataset] if "tune" in a.parts else [])}:
        dataset_dir(a.data_root, name)  # fail before any work
    result: dict[str, Any] = {"benchmark": "text_ablation", "args": vars(a), "environment": environment()}
    t_all = time.time()
    for part, fn in (("augment", part_augment), ("pooling", part_pooling), ("tune", part_tune)):
        if part in a.parts:
            t0 = time.time()
            result[part] = {**fn(a), "part_seconds": round(time.time() - t0, 1)}
            write_result(Path(a.out), result)
    result["total_seconds"] = round(time.time() - t_all, 1)

    print()
    if "augment" in result:
        r = result["augment"]
        print(f"augmentation ({r['model']}, {r['train_rows']} training rows, seeds {r['seeds']}): test accuracy")
        for name, d in r["datasets"].items():
            print(f"  {name:<18} none {fmt(d['arms']['none']['test_accuracy'])}   default {fmt(d['arms']['default']['test_accuracy'])}"
                  f"   delta {d['delta_mean']:+.4f}")
    if "pooling" in result:
        r = result["pooling"]
        print(f"pooling ({r['model']} on {a.pool_dataset}, seeds {r['seeds']}): cls {fmt(r['arms']['cls']['test_accuracy'])}"
              f"   attention {fmt(r['arms']['attention']['test_accuracy'])}   delta {r['delta_mean']:+.4f}")
    if "tune" in result:
        r = result["tune"]
        print(f"tune ({r['model']} on {a.tune_dataset}, {r['trials']['total']} trials, {r['epochs']} epochs): "
              f"tuned {r['tuned']['test_accuracy']:.4f} vs default {r['default']['test_accuracy']:.4f}  "
              f"(delta {r['delta']:+.4f}; best params {r['best_params']})")
    print(f"total {result['total_seconds']:.0f} s")
    write_result(Path(a.out), result)


if __name__ == "__main__":
    main()
