"""Merge per-seed result files of train_seeds.py into one mean ± std line.

    python benchmarks/summarize_seeds.py benchmarks/results/pneumoniamnist_seed*.json
"""
from __future__ import annotations

import json
import statistics
import sys

rows = [r for path in sys.argv[1:] for r in json.load(open(path))["runs"]]
acc = [r["test_accuracy"] for r in rows]
wall = [r["wall_seconds"] for r in rows]
for r in rows:
    print(f"seed {r['seed']}: test accuracy {r['test_accuracy']:.4f}  f1_macro {r['test_f1_macro']:.4f}  "
          f"valid accuracy {r['valid_accuracy']:.4f}  best epoch {r['best_epoch']}  wall {r['wall_seconds']} s")
std = statistics.stdev(acc) if len(acc) > 1 else 0.0
print(f"test accuracy {statistics.mean(acc):.4f} ± {std:.4f} (min {min(acc):.4f}, n={len(acc)}); "
      f"wall median {statistics.median(wall)} s, max {max(wall)} s")
