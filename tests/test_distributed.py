"""Two CPU processes (torchrun, gloo) train to the same quality as one process, every text model
with one vocabulary for both processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import duoclass
from duoclass.distributed import vocabulary_digest
from duoclass.models import available

from .conftest import run_cli

ARGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "6", "--lr", "0.003", "--augment", "none",
        "--device", "cpu", "--workers", "0", "--no-progress", "--no-tensorboard", "--seed", "0"]


@pytest.mark.slow  # long: runs with `make test-slow`
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


@pytest.mark.slow  # long: runs with `make test-slow`
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


# albert-scratch-small is albert-scratch-tiny with more layers: the same code, twice the time; the n-gram
# models (fasttext, tfidf-mlp) take the same data path as each other: all three run with `make test-slow`
TEXT_MODELS = [s.name if s.name == "albert-scratch-tiny" else pytest.param(s.name, marks=pytest.mark.slow)
               for s in available("text")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .test_text import make_toy

    return make_toy(tmp_path_factory.mktemp("text") / "toy", 160, 40)


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_every_text_model_trains_under_two_processes(model: str, toy: Path, tmp_path: Path) -> None:
    """Attention pooling (every parameter used, or DDP fails) and one vocabulary for all processes.

    A WordPiece tokenizer trained in each process comes out different (same size, other ids);
    rank 0 trains it and sends it, and the run logs its hash after every process checked its own.
    """
    pooling = [] if model == "tfidf-mlp" else ["--pooling", "attention"]  # a bag of n-grams has no token states
    r = run_cli("train", str(toy), "--model", model, *pooling, "--epochs", "6", "--batch-size", "16", "--nproc=2",
                "--device", "cpu", "--workers", "0", "--no-progress", "--no-tensorboard", "--output", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["accuracy"] >= 0.8  # chance is 0.5
    digest = vocabulary_digest(duoclass.load(tmp_path / "run" / "model").preprocessor)
    if model == "fasttext":  # hashed n-grams: nothing built from the data
        assert digest is None and "vocabulary:" not in r.stderr
        return
    assert digest is not None
    assert f"vocabulary: {digest[0]} tokens, sha256 {digest[1][:16]}, the same in all 2 processes" in r.stderr, r.stderr[-3000:]
