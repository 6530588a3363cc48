"""Two CPU processes (torchrun, gloo) train to the same quality as one process, every text model
with one vocabulary for both processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import duoclass
from duoclass.training.distributed import vocabulary_digest
from duoclass.models import available

from .conftest import run_cli

ARGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "6", "--lr", "0.003", "--augment", "none",
        "--device", "cpu", "--workers", "0", "--no-progress", "--no-tensorboard", "--seed", "0", "--explain-examples", "0"]


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


# --- prepare_once in two real processes (gloo on loopback, no training) --------------------------
RANK_SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
from duoclass.errors import DuoclassError
from duoclass.settings.config import TrainConfig
from duoclass.training import distributed
from duoclass.training.run import prepare, resolve

rank = int(os.environ["RANK"])
data_dirs, out, tamper, probes = json.loads(sys.argv[1])
cfg = resolve(TrainConfig(data=data_dirs[rank], model="albert-scratch-tiny", device="cpu", seed=0, workers=0,
                          progress=False, tensorboard=False))

def prep(cfg, given=None):
    data = prepare(cfg, given=given)
    if tamper and rank == 1:  # this rank's vocabulary differs from rank 0's, whatever prepare_once did
        data.preprocessor.tokenizer.add_tokens(["tamperedtoken"])
    return data

try:
    data = distributed.prepare_once(cfg, prep)
    pre = data.preprocessor
    result = {"digest": list(distributed.vocabulary_digest(pre)), "ids": pre.encode(probes),
              "vocab": sorted(pre.tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
except DuoclassError as e:
    result = {"error": str(e)}
finally:
    if dist.is_initialized():
        dist.destroy_process_group()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
"""

PROBES = ["the movie was good", "a zebra and a quokka", "really quite dreadful plot"]


def _shards(root: Path) -> list[str]:
    """Two copies of a toy dataset with the same classes: rank 1's training texts are another sample, and mention
    words rank 0's never do, so a vocabulary built from rank 1's copy differs from rank 0's."""
    from .test_text import toy_rows, write_csv

    out = []
    for rank, extra in ((0, ""), (1, " zebra quokka")):
        d = root / f"rank{rank}"
        write_csv(d / "train.csv", [(i, t + extra, y) for i, t, y in toy_rows(80, "train", rank)])
        write_csv(d / "valid.csv", toy_rows(20, "valid", 10))
        out.append(str(d))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_in_two_processes(tmp_path: Path, tamper: bool) -> list[dict]:
    """prepare_once in two processes joined like torchrun joins them (env://, gloo, loopback); each rank's result."""
    data_dirs, out = _shards(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    port = _free_port()
    arg = json.dumps([data_dirs, str(out), tamper, PROBES])
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, arg], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        logs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.timeout(180)
def test_every_rank_gets_rank_0s_vocabulary(tmp_path: Path) -> None:
    """Holds: rank 0 builds the vocabulary once and every rank uses it: in two real processes whose copies of the
    training texts differ, both hold the same vocabulary (token -> id) and give the same token ids to the same texts,
    and neither knows a word only rank 1's copy has."""
    r0, r1 = _prepare_in_two_processes(tmp_path, tamper=False)
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert r0["vocab"] == r1["vocab"] and r0["digest"] == r1["digest"]
    assert r0["ids"] == r1["ids"]
    assert not any("zebra" in token for token, _ in r1["vocab"])  # rank 1 did not build its own from its copy


@pytest.mark.timeout(180)
def test_ranks_with_different_vocabularies_are_refused(tmp_path: Path) -> None:
    """Holds: the vocabulary digest check: when one rank's vocabulary differs from rank 0's (forced on rank 1 after
    prepare), prepare_once refuses on every rank with an error naming each rank's digest, instead of training."""
    r0, r1 = _prepare_in_two_processes(tmp_path, tamper=True)
    for r in (r0, r1):
        assert "error" in r, r.get("digest")
        assert "the processes hold different vocabularies" in r["error"] and "rank 0:" in r["error"] and "rank 1:" in r["error"]
