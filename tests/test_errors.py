"""Bad input on the command line: one clear `error: ...` line on stderr, exit status 2, no traceback.

Each case runs the real CLI (`python -m duoclass ...`) in a subprocess with cwd=tmp_path and checks
that the message names the offending path or value and says how to fix it.

Starting a subprocess costs a few seconds (importing torch), so the module-scoped `outcomes` fixture
prepares the inputs of every selected case, runs all the commands concurrently, and each parametrized
test then checks the result of its own case.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from duoclass.errors import DuoclassError

TRAIN_FLAGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "1", "--batch-size", "8",
               "--no-progress", "--no-tensorboard", "--device", "cpu"]


# --- data helpers ----------------------------------------------------------------------------
def write_class(folder: Path, n: int, base: tuple[int, int, int]) -> None:
    """n 16x16 PNGs of slightly different shades of `base` (no two files identical)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), tuple(min(255, c + 3 * i) for c in base)).save(folder / f"{i:02d}.png")


def make_dataset(root: Path, n: int = 10, test: int = 4) -> Path:
    write_class(root / "train" / "red", n, (200, 10, 10))
    write_class(root / "train" / "blue", n, (10, 10, 200))
    if test:
        write_class(root / "test" / "red", test, (190, 20, 20))
        write_class(root / "test" / "blue", test, (20, 20, 190))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, model folder): a tiny two-class model trained for one epoch with the Python API."""
    import duoclass

    base = tmp_path_factory.mktemp("trained")
    data = make_dataset(base / "data")
    run = base / "run"
    clf = duoclass.train(str(data), model="msresnet-tiny", image_size=16, epochs=1, batch_size=8, output=str(run),
                         progress=False, tensorboard=False, device="cpu")
    model_dir = Path(clf.result_.model_dir)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    return data, model_dir


# --- cases -----------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What a case's setup gets: its own empty folder (the subprocess cwd) and, on demand, the trained model."""

    tmp: Path
    _trained: Callable[[], tuple[Path, Path]]

    @property
    def data(self) -> Path:
        return self._trained()[0]

    def model_copy(self) -> Path:
        dst = self.tmp / "model"
        shutil.copytree(self._trained()[1], dst)
        return dst


@dataclass
class Case:
    setup: Callable[[Ctx], tuple[list, list[str]]]  # -> (CLI arguments, strings the error line must contain)
    needs_model: bool = False
    # False where warnings legitimately precede the error line; the error must still be the last line.
    only_line: bool = True
    env: dict | None = None  # extra environment variables for the command
    settings: bool = False  # a bad setting: refused before the run folder is created


CASES: dict[str, Case] = {}


def case(name: str, needs_model: bool = False, only_line: bool = True, env: dict | None = None,
         settings: bool = False) -> Callable:
    def deco(fn: Callable[[Ctx], tuple[list, list[str]]]) -> Callable:
        CASES[name] = Case(fn, needs_model, only_line, env, settings)
        return fn

    return deco


# training data
@case("train-missing-folder")
def _(c: Ctx):
    missing = c.tmp / "does_not_exist"
    return ["train", missing, "--output", c.tmp / "run", *TRAIN_FLAGS], [str(missing), "no such file or folder", "ImageFolder"]


@case("train-one-class")
def _(c: Ctx):
    root = c.tmp / "ds"
    write_class(root / "train" / "onlyclass", 4, (200, 10, 10))
    return ["train", root, "--output", c.tmp / "run", *TRAIN_FLAGS], [str(root), "'onlyclass'", "at least 2 classes"]


@case("train-empty-class-folder")
def _(c: Ctx):
    root = c.tmp / "ds"
    write_class(root / "train" / "a", 4, (200, 10, 10))
    (root / "train" / "b").mkdir()
    return ["train", root, "--output", c.tmp / "run", *TRAIN_FLAGS], [str(root / "train" / "b"), "has no images", "remove the folder"]


@case("train-manifest-without-path-column")
def _(c: Ctx):
    write_class(c.tmp / "img" / "a", 3, (200, 10, 10))
    write_class(c.tmp / "img" / "b", 3, (10, 10, 200))
    manifest = c.tmp / "manifest.csv"
    rows = ["file,label"] + [f"img/{k}/{i:02d}.png,{k}" for k in "ab" for i in range(3)]
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return (["train", manifest, "--output", c.tmp / "run", *TRAIN_FLAGS],
            [str(manifest), "no 'path' column", "file, label", "--path-column"])


# settings
@case("train-unknown-model")
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    flags = [("nosuchnet" if a == "msresnet-tiny" else a) for a in TRAIN_FLAGS]
    return ["train", data, "--output", c.tmp / "run", *flags], ["'nosuchnet'", "`duoclass models`"]


@case("train-negative-epochs")
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    return ["train", data, "--output", c.tmp / "run", *TRAIN_FLAGS, "--epochs", "-1"], ["--epochs", "got -1", "e.g. --epochs 10"]


@case("train-resume-folder-without-state")
def _(c: Ctx):
    run = c.tmp / "not_a_run"
    run.mkdir()
    return ["train", "--resume", run], [str(run / "config.yaml"), "not found", "--resume needs the folder of an earlier run"]


@case("train-resume-with-data-folder-without-state")
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    run = c.tmp / "not_a_run"
    run.mkdir()
    return ["train", data, "--resume", run, *TRAIN_FLAGS], [str(run / "state.pt"), "no training state to resume from", "--output"]


@case("train-yaml-unknown-key")
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    cfg = c.tmp / "settings.yaml"
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n", encoding="utf-8")
    return (["train", data, "--config", cfg, "--output", c.tmp / "run"],
            [str(cfg), "unknown setting(s) learning_rate", "duoclass train --help"])


@case("train-lr-not-a-number", settings=True)
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    return (["train", data, "--output", c.tmp / "run", *TRAIN_FLAGS, "--lr", "abc"],
            ["--lr: got 'abc'", "expected a number", "e.g. --lr 1e-3"])


@case("train-yaml-string-for-bool", settings=True)
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    cfg = c.tmp / "settings.yaml"
    cfg.write_text("epochs: 1\namp: 'yes'\n", encoding="utf-8")
    return (["train", data, "--config", cfg, "--output", c.tmp / "run"],
            ["--amp: got 'yes'", "expected true or false", "--no-amp"])


@case("train-select-metric-typo", settings=True)
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    return (["train", data, "--output", c.tmp / "run", *TRAIN_FLAGS, "--select-metric", "f1-macro"],
            ["--select-metric: unknown metric 'f1-macro'", "did you mean f1_macro?", "balanced_accuracy"])


@case("train-impossible-scale", settings=True)
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    return (["train", data, "--output", c.tmp / "run", *TRAIN_FLAGS, "--scale", "1.5"],
            ["--scale: got 1.5", "[0, 1)"])


@case("train-negative-max-steps", settings=True)
def _(c: Ctx):
    data = make_dataset(c.tmp / "data", n=3, test=0)
    return (["train", data, "--output", c.tmp / "run", *TRAIN_FLAGS, "--max-steps", "-5"],
            ["--max-steps: got -5", ">= 0"])


@case("train-text-offline-default-model", env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://hub.duoclass-offline.invalid"})
def _(c: Ctx):
    data = c.tmp / "texts"
    data.mkdir()
    rows = ["text,label"] + [f"{w} movie number {i},{lab}" for i in range(6) for w, lab in (("great", "pos"), ("awful", "neg"))]
    (data / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # the default text model needs pretrained weights; the way out names tfidf-mlp first
    return (["train", data, "--epochs", "1", "--output", c.tmp / "run", "--no-progress", "--no-tensorboard"],
            ["hf:albert-base-v2", "not reachable", "with `--model tfidf-mlp` (the most accurate duoclass model that needs none)"])


@case("models-timm-no-match")
def _(c: Ctx):
    return ["models", "--timm", "zz_no_such_net"], ["--timm zz_no_such_net", "no timm model name matches", "--timm resnet"]


# model folders: missing or damaged files, for predict and for evaluate
def _delete(name: str) -> Callable[[Path], Path]:
    def damage(m: Path) -> Path:
        (m / name).unlink()
        return m / name

    return damage


def _flip_byte(m: Path) -> Path:
    p = m / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    return p


def _garble_config(m: Path) -> Path:
    p = m / "config.json"
    p.write_text(p.read_text(encoding="utf-8")[:40], encoding="utf-8")  # truncated JSON
    return p


def _foreign_config(m: Path) -> Path:
    p = m / "config.json"
    p.write_text(json.dumps({"hello": "world"}), encoding="utf-8")
    return p


def _wrong_type_in_config(m: Path) -> Path:
    p = m / "config.json"
    cfg = json.loads(p.read_text(encoding="utf-8"))
    cfg["files"] = list(cfg["files"])  # valid JSON, wrong shape
    p.write_text(json.dumps(cfg), encoding="utf-8")
    return p


DAMAGE = {
    "missing-weights": (_delete("model.safetensors"), ["missing from the model folder", "copy the whole folder again"]),
    "tampered-weights": (_flip_byte, ["checksum mismatch", "copy the model folder again"]),
    "missing-config": (_delete("config.json"), ["missing", "copy the whole folder"]),
    "garbled-config": (_garble_config, ["not valid JSON", "copy the model folder again"]),
    "foreign-config": (_foreign_config, ["not a duoclass model config", "duoclass train"]),
    "config-wrong-shape": (_wrong_type_in_config, ["'files' should be a JSON object", "copy the model folder again"]),
}


def _damaged_case(command: str, damage: str) -> None:
    fn, words = DAMAGE[damage]

    def setup(c: Ctx):
        model = c.model_copy()
        bad = fn(model)
        target = c.data / "test" / "red" / "00.png" if command == "predict" else c.data
        return [command, model, target], [str(bad), *words]

    CASES[f"{command}-{damage}"] = Case(setup, needs_model=True)


for _command in ("predict", "evaluate"):
    for _damage in DAMAGE:
        # read_model_folder is shared by both commands; the rarer damages are checked through predict only
        if _command == "predict" or _damage not in ("foreign-config", "config-wrong-shape"):
            _damaged_case(_command, _damage)


# evaluate
@case("evaluate-unknown-split", needs_model=True)
def _(c: Ctx):
    return (["evaluate", c.model_copy(), c.data, "--split", "holdout"],
            [str(c.data), "no 'holdout' split", "found: test, train", "--split NAME"])


@case("evaluate-label-unseen-in-training", needs_model=True)
def _(c: Ctx):
    other = c.tmp / "other"
    shutil.copytree(c.data, other)
    write_class(other / "test" / "green", 2, (10, 200, 10))
    return (["evaluate", c.model_copy(), other],
            [str(other), "label 'green' never appears in the training data", "known: blue, red", "fix the label"])


@case("evaluate-split-all-unreadable", needs_model=True, only_line=False)
def _(c: Ctx):
    data = c.tmp / "ds"
    shutil.copytree(c.data / "train", data / "train")
    (data / "test" / "red").mkdir(parents=True)
    (data / "test" / "red" / "fake.png").write_bytes(b"not a png")
    return (["evaluate", c.model_copy(), data],
            [str(data), "('test' split): nothing to evaluate", "none of its 1 inputs could be read", "--split"])


# predict
@case("predict-missing-input", needs_model=True)
def _(c: Ctx):
    missing = c.tmp / "no_such_image.png"
    return ["predict", c.model_copy(), missing], [str(missing), "no such file or folder", "pass an image"]


@case("predict-corrupt-zip", needs_model=True)
def _(c: Ctx):
    bad = c.tmp / "inputs.zip"
    bad.write_bytes(b"not a zip at all")
    return ["predict", c.model_copy(), bad], [str(bad), "not a readable zip file", "unzip it"]


# --- running ---------------------------------------------------------------------------------
def run_cli(cwd: Path, args: list, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "duoclass", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=180, env=env)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """case name -> (CompletedProcess, needles, Ctx) for every selected case, run concurrently."""
    selected = [it.callspec.params["name"] for it in request.session.items
                if getattr(it, "function", None) is test_bad_input and hasattr(it, "callspec")]
    trained = lambda: request.getfixturevalue("trained")  # noqa: E731  (trained only when a case needs it)
    # Cases without a model start first, so they run while the model trains.
    selected.sort(key=lambda name: CASES[name].needs_model)
    workers = max(2, min(8, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = {}
        for name in selected:
            ctx = Ctx(tmp_path_factory.mktemp(name), trained)
            args, needles = CASES[name].setup(ctx)
            started[name] = (pool.submit(run_cli, ctx.tmp, args, CASES[name].env), needles, ctx)
        return {name: (future.result(), needles, ctx) for name, (future, needles, ctx) in started.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(outcomes: dict, name: str) -> None:
    r, needles, ctx = outcomes[name]
    detail = f"\n--- {name}: rc={r.returncode}\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}"
    assert "Traceback" not in r.stdout and "Traceback" not in r.stderr, detail
    assert r.returncode == 2, detail
    # These errors come before any work starts, so stderr is the error line and nothing else
    # (or, where a case allows it, warnings about the input and then the error line, last).
    lines = r.stderr.strip().splitlines()
    assert lines and sum(x.startswith("error: ") for x in lines) == 1, detail
    if CASES[name].only_line:
        assert len(lines) == 1, detail
    line = lines[-1]
    assert line.startswith("error: "), detail
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line{detail}"
    assert r.stdout == "", detail
    assert not (ctx.tmp / "run" / "model").exists(), "a failed run must not leave a model folder"
    if CASES[name].settings:
        assert not (ctx.tmp / "run").exists(), "a bad setting must be refused before the run folder is made"


# --- evaluate reads CSV manifests with other column names ---------------------------------------
def test_evaluate_column_flags(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = trained
    files = sorted((data / "test").rglob("*.png"))
    manifest = tmp_path / "holdout.csv"
    manifest.write_text("file,truth\n" + "".join(f"{f},{f.parent.name}\n" for f in files), encoding="utf-8")
    r = run_cli(tmp_path, ["evaluate", model, manifest, "--split", "train", "--path-column", "file", "--label-column",
                           "truth", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["n"] == len(files) == 8 and 0 <= m["accuracy"] <= 1
    r = run_cli(tmp_path, ["evaluate", model, manifest, "--split", "train", "--json"])  # the training columns: path, label
    assert r.returncode == 2 and "no 'path' column" in r.stderr and "--path-column" in r.stderr


# --- loading never unpickles: a planted malicious pickle is refused and never runs ------------------
class _Plant:
    """Unpickling this runs `open(marker, "w")`: what an attacker's state.pt or weights file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_real(tmp_path: Path) -> None:
    """The payload used below is real (so its refusal below means something): its pickle holds a REDUCE of the
    call, and that call, which an unsafe unpickler makes, writes the marker."""
    import pickle
    import pickletools

    marker = tmp_path / "ran"
    ops = {op.name for op, _, _ in pickletools.genops(pickle.dumps(_Plant(marker)))}
    assert "REDUCE" in ops
    fn, args = _Plant(marker).__reduce__()
    fn(*args)  # what unpickling it would do
    assert marker.read_text() == "pwned"


def test_planted_pickle_state_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import pickle

    import torch

    from duoclass.artifacts.state import load_state

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(trained[1].parent, run)
    for how, write in (("torch.save", lambda p: torch.save({"model": _Plant(marker)}, p)),
                       ("raw pickle", lambda p: p.write_bytes(pickle.dumps({"model": _Plant(marker)})))):
        write(run / "state.pt")
        with pytest.raises(DuoclassError, match=r"state\.pt: training state is unreadable"):
            load_state(run / "state.pt")
        assert not marker.exists(), how
    # and through the CLI: --resume of that run
    r = run_cli(tmp_path, ["train", "--resume", run, "--epochs", "2"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {run / 'state.pt'}: training state is unreadable"), r.stderr[-2000:]
    assert lines[-1].endswith("start a new run without --resume")  # one line, however long the library's message
    assert not marker.exists()


def test_planted_pickle_weights_are_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A pickle as model.safetensors, with config.json's hashes redone so the checksums pass."""
    import pickle

    import duoclass
    from duoclass.artifacts.folder import config_digest, read_model_folder

    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    shutil.copytree(trained[1], folder)
    payload = pickle.dumps({"normalize.mean": _Plant(marker)})
    (folder / "model.safetensors").write_bytes(payload)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg["files"]["model.safetensors"] = hashlib.sha256(payload).hexdigest()
    if "config_sha256" in cfg:
        cfg["config_sha256"] = config_digest(cfg)
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    for load in (read_model_folder, duoclass.load):
        with pytest.raises(DuoclassError, match=r"model\.safetensors: unreadable weights"):
            load(folder)
        assert not marker.exists()
    r = run_cli(tmp_path, ["predict", folder, trained[0] / "test" / "red" / "00.png"])
    assert r.returncode == 2 and "unreadable weights" in r.stderr and not marker.exists()
