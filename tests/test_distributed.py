"""Two CPU processes (torchrun, gloo) train to the same quality as one process."""
from __future__ import annotations

import json
from pathlib import Path

from .conftest import run_cli

ARGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "6", "--lr", "0.003", "--augment", "none",
        "--device", "cpu", "--workers", "0", "--no-progress", "--no-tensorboard", "--seed", "0"]


def test_two_processes_match_one(digits: Path, tmp_path: Path) -> None:
    one = run_cli("train", str(digits), *ARGS, "--batch-size", "64", "--output", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(digits), *ARGS, "--batch-size", "32", "--nproc", "2", "--output", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stderr  # it really ran under DDP
    a1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["test"]["accuracy"]
    a2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]["accuracy"]
    # same global batch (2 x 32 = 64) and schedule: equal quality within seed noise
    assert a1 > 0.8 and a2 > 0.8, (a1, a2)
    assert abs(a1 - a2) < 0.05, (a1, a2)


def test_text_two_processes_with_length_buckets(tmp_path: Path) -> None:
    from .test_text import make_toy

    data = make_toy(tmp_path / "toy", 320, 40)
    r = run_cli("train", str(data), "--model", "albert-scratch-tiny", "--epochs", "4", "--batch-size", "16", "--nproc", "2",
                "--device", "cpu", "--workers", "0", "--no-progress", "--no-tensorboard", "--output", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stderr
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5  # header + 4 epochs
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["accuracy"] >= 0.8  # chance is 0.5
