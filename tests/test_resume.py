"""Interrupted training resumes: SIGKILL mid-epoch, --resume, identical final metrics (deterministic, CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duoclass.checkpoint import atomic_write_bytes, load_state

from .conftest import run_cli

ARGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "4", "--batch-size", "32", "--lr", "0.003",
        "--deterministic", "--device", "cpu", "--seed", "3", "--workers", "0", "--no-progress", "--no-tensorboard"]


def _final(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {"best_epoch": m["best_epoch"], "valid": m["valid"], "test": m["test"]}


def _losses(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["train_loss"], r["valid_loss"], r["valid_accuracy"]) for r in rows]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(digits: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    r = run_cli("train", str(digits), *ARGS, "--output", str(ref))
    assert r.returncode == 0, r.stderr
    epoch_s = json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])["seconds"]

    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "duoclass", "train", str(digits), *ARGS, "--output", str(run)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (run / "state.pt").exists():  # first epoch finished and saved
        assert p.poll() is None, "training ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(max(0.2, epoch_s * 0.4))  # well inside epoch 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "metrics.json").exists(), "the run finished before the kill; nothing was interrupted"
    epochs_done = load_state(run / "state.pt")["epoch"]
    assert 1 <= epochs_done < 4

    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert f"after epoch {epochs_done}" in r.stderr
    assert _losses(run) == _losses(ref)
    assert _final(run) == _final(ref)


def test_resume_of_a_finished_run_changes_nothing(digits: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [a if a != "4" else "1" for a in ARGS]
    assert run_cli("train", str(digits), *args, "--output", str(run)).returncode == 0
    before = _final(run)
    r = run_cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stderr
    assert _final(run) == before


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    atomic_write_bytes(target, b"old")

    class Boom(Exception):
        pass

    from duoclass.checkpoint import atomic_write

    def half(f):  # noqa: ANN001
        f.write(b"new but torn")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temp file left behind
