"""Length-bucketed batches against plain shuffling: training time per epoch and test accuracy, side by side.

For each dataset, `duoclass train DATA --model M --epochs E --seed S` runs with the default
length buckets and with `--no-length-buckets`, alternating, --repeats times each. From each
run's metrics.csv it takes the seconds of every epoch (training plus validation; the first
epoch is included, no warm-up is dropped) and reports the median per arm, the ratio
plain / buckets, and each arm's test accuracy.

    .venv/bin/python benchmarks/text_buckets.py

Writes benchmarks/results/text_buckets.json (or --out).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

from bench_common import DEFAULT_DATA, RESULTS, RUNS, dataset_dir, environment, run_cli, run_metrics, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["sms_spam"])
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding the dataset folders")
    p.add_argument("--model", default="albert-scratch-tiny")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "text_buckets.json"))
    a = p.parse_args()
    dirs = {name: dataset_dir(a.data_root, name) for name in a.datasets}  # fail before any work
    result: dict[str, Any] = {"benchmark": "text_buckets", "args": vars(a), "environment": environment(), "datasets": {}}
    for name, data in dirs.items():
        arms: dict[str, dict[str, Any]] = {arm: {"epoch_seconds": [], "test_accuracy": []} for arm in ("buckets", "plain")}
        for rep in range(a.repeats):
            for arm in ("buckets", "plain"):
                out = RUNS / "text_buckets" / name / f"{arm}-{rep}"
                flag = [] if arm == "buckets" else ["--no-length-buckets"]
                t0 = time.time()
                run_cli(["train", data, "--model", a.model, "--epochs", a.epochs, "--max-length", a.max_length,
                         "--seed", a.seed, "--output", out, "--no-progress", "--no-tensorboard", *flag], out.with_suffix(".log"))
                secs = [float(r["seconds"]) for r in csv.DictReader((out / "metrics.csv").open())]
                arms[arm]["epoch_seconds"] += secs
                arms[arm]["test_accuracy"].append(run_metrics(out)["test_accuracy"])
                print(f"  {name} {arm} repeat {rep}: epochs {secs} s, test accuracy {arms[arm]['test_accuracy'][-1]:.4f}, "
                      f"wall {time.time() - t0:.1f} s", flush=True)
        for arm in arms.values():
            arm["median_epoch_seconds"] = statistics.median(arm["epoch_seconds"])
        ratio = arms["plain"]["median_epoch_seconds"] / arms["buckets"]["median_epoch_seconds"]
        result["datasets"][name] = {"arms": arms, "plain_over_buckets": round(ratio, 3)}
        print(f"{name}: median epoch {arms['buckets']['median_epoch_seconds']:.1f} s with buckets, "
              f"{arms['plain']['median_epoch_seconds']:.1f} s plain (x{ratio:.2f}); test accuracy buckets "
              f"{arms['buckets']['test_accuracy']} plain {arms['plain']['test_accuracy']}", flush=True)
        write_result(Path(a.out), result)


if __name__ == "__main__":
    main()
