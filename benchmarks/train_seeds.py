"""Train one dataset over several seeds with the duoclass CLI and report mean ± std test accuracy.

Each seed is a separate `duoclass train` process, timed end to end (data reading,
training, final test evaluation). Results go to a JSON file for RESULTS.md.

    python benchmarks/train_seeds.py ../shared/data/images/pneumoniamnist --seeds 0 1 2 \
        --out benchmarks/results/pneumoniamnist.json -- --model msresnet
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", default="runs/bench")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    extra = argv[cut + 1 :]  # `duoclass train` flags after --
    name = Path(a.data).name
    rows = []
    for seed in a.seeds:
        out = Path(a.runs) / f"{name}-seed{seed}"
        cmd = [sys.executable, "-m", "duoclass", "train", a.data, "--seed", str(seed), "--output", str(out), "--no-progress", *extra]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode != 0:
            sys.exit(f"seed {seed} failed:\n{r.stderr[-2000:]}")
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"seed": seed, "test_accuracy": m["test"]["accuracy"], "test_f1_macro": m["test"]["f1_macro"],
                     "valid_accuracy": m["valid"]["accuracy"], "best_epoch": m["best_epoch"], "wall_seconds": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
    accs = [r["test_accuracy"] for r in rows]
    summary = {
        "data": a.data, "train_args": extra, "runs": rows,
        "test_accuracy_mean": statistics.mean(accs), "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_accuracy_min": min(accs), "wall_seconds_median": statistics.median(r["wall_seconds"] for r in rows),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"test accuracy {summary['test_accuracy_mean']:.4f} ± {summary['test_accuracy_std']:.4f} "
          f"(min {summary['test_accuracy_min']:.4f}) over {len(accs)} seeds; median wall {summary['wall_seconds_median']} s")


if __name__ == "__main__":
    main()
