"""Interrupted training resumes with identical results (deterministic, CPU).

Two kinds of interruption:
- SIGKILL mid-epoch, then `--resume`.
- A kill at each step of a model-folder save (mkdir, each file written, each fsync, the swap, the
  clean-up), then `--resume`: the killed run leaves a folder that loads (old or new, never a mix)
  and the resumed run ends with exactly the files and metrics of an uninterrupted run.

The save-step runs are many short trainings. Each is a real `duoclass.cli.main` in its own
process that dies by `os._exit(137)`; to spare each of them the 8 s of imports, one driver
subprocess imports duoclass once and forks every run from there (`fault_driver` below).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from duoclass.artifacts.atomic import atomic_write_bytes
from duoclass.artifacts.state import load_state

from .conftest import ROOT, run_cli
from .test_text import make_toy

ARGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "4", "--batch-size", "32", "--lr", "0.003",
        "--deterministic", "--device", "cpu", "--seed", "3", "--workers", "0", "--no-progress", "--no-tensorboard",
        "--explain-examples", "0"]


def _final(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {"best_epoch": m["best_epoch"], "valid": m["valid"], "test": m["test"]}


def _losses(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["train_loss"], r["valid_loss"], r["valid_accuracy"]) for r in rows]


@pytest.mark.slow  # the kill at every step of a save (below) covers resume in the default run
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


@pytest.mark.slow  # long: runs with `make test-slow`
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

    from duoclass.artifacts.atomic import atomic_write

    def half(f):  # noqa: ANN001
        f.write(b"new but torn")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temp file left behind


class _Payload:
    """Unpickling this runs `open(marker, "w")`: what a planted state.pt would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


LOAD_UNSAFE_DEFAULT = """
import sys, torch
from duoclass.artifacts.state import load_state
from duoclass.errors import DuoclassError

control, *states = sys.argv[1:]
torch.load(control)  # torch's default here: weights_only=False, so this one runs its payload
for path in states:
    try:
        load_state(path)
    except DuoclassError as e:
        print("refused", e)
    else:
        print("loaded", path)
"""


def test_a_planted_pickle_state_is_refused_whatever_torchs_default(tmp_path: Path) -> None:
    """Holds: load_state refuses a state.pt whose pickle would run code, and runs none of it, even where
    torch.load defaults to weights_only=False (torch < 2.6, which pyproject allows; here forced with
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in a subprocess): it passes weights_only=True itself."""
    import pickle

    import torch

    control = tmp_path / "control.pt"
    torch.save({"model": _Payload(tmp_path / "control-ran")}, control)
    states = []
    for how in ("torch.save", "raw pickle"):
        path = tmp_path / how.replace(" ", "-") / "state.pt"
        path.parent.mkdir()
        state = {"epoch": 1, "model": _Payload(tmp_path / f"{path.parent.name}-ran")}
        if how == "torch.save":
            torch.save(state, path)
        else:
            path.write_bytes(pickle.dumps(state))
        states.append(path)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)  # torch refuses both at once
    r = subprocess.run([sys.executable, "-c", LOAD_UNSAFE_DEFAULT, str(control), *map(str, states)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "control-ran").is_file(), "the switch did not make torch.load unsafe: this test would prove nothing"
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    for path, line in zip(states, lines):
        assert line.startswith(f"refused {path}: training state is unreadable"), line
        assert not (tmp_path / f"{path.parent.name}-ran").exists(), f"{path}: its payload ran"


# --- a kill at each step of a model-folder save ----------------------------------------------
TEXT_ARGS = ["--model", "tfidf-mlp", "--epochs", "3", "--batch-size", "16", "--lr", "0.01"]
IMAGE_ARGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "3", "--batch-size", "16", "--lr", "0.003"]
COMMON = ["--deterministic", "--device", "cpu", "--seed", "0", "--workers", "0", "--no-progress", "--no-tensorboard"]

# A 3-epoch run on data it fits at once saves its folder after every epoch (a tie keeps the later
# epoch) and once more for the final metrics: saves 1, 2, 3 and 4. Save 1 has no folder to replace
# and no state.pt to resume from yet; save 2 replaces a folder mid-run; save 4 is
# update_model_folder_metrics after the last epoch. Each step is a helper of artifacts.atomic.replace_folder
# (or an os.fsync inside one), killed just before it runs; "done" kills right after the save.
# Swap "exchange" is the one-step swap of Linux; "rename" the two renames used where there is none.
TEXT_FILES = ["model.safetensors", "metrics.json", "ngrams.json", "config.json"]
IMAGE_FILES = ["model.safetensors", "metrics.json", "config.json"]


def save_steps(files: list[str], swap: str, first: bool = False) -> list[str]:
    """The steps of one folder save, as fault_driver labels them (new = .model.duoclass-new)."""
    steps = ["mkdir new"] + [f"{op} new/{f}" for f in files for op in ("write", "fsync")] + ["fsync new"]
    if first:
        return steps + ["rename new model", "fsync run", "done"]
    if swap == "exchange":
        return steps + ["exchange new model", "fsync run", "rmtree new", "done"]
    return steps + ["rename model old", "rename new model", "fsync run", "rmtree old", "done"]


def expected_folder(steps: list[str], i: int, first: bool = False) -> str:
    """What RUN/model holds after a kill before steps[i]: the old folder until the swap has begun
    (between the two renames, the next read finishes the swap), the new one after."""
    swap = next(s for s in steps if s.startswith(("exchange", "rename")))
    return ("new" if i > steps.index(swap) else "none" if first else "old")


def exchange_works(where: Path) -> bool:
    """Whether this OS and filesystem swap two folders in one step (else saves use two renames)."""
    from duoclass.artifacts.atomic import _exchange

    (where / "a").mkdir(parents=True)
    (where / "b").mkdir()
    return _exchange(where / "a", where / "b")


def _label(name: str, args: tuple, run: Path) -> str:
    """'write new/config.json' for _write_file(RUN/.model.duoclass-new/config.json, ...)."""
    def short(x: Any) -> str:
        if isinstance(x, int):  # an fd given to os.fsync
            x = os.readlink(f"/proc/self/fd/{x}")
        s = str(x).replace(str(run), "run")
        for long, abbrev in (("run/.model.duoclass-new", "new"), ("run/.model.duoclass-old", "old"), ("run/model", "model")):
            s = s.replace(long, abbrev)
        return s

    return " ".join([name.strip("_").replace("write_file", "write")] + [short(a) for a in args if isinstance(a, (str, Path, int))])


def _files(folder: Path) -> dict[str, bytes] | None:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else None


def _history(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "metrics.jsonl").read_text().splitlines()]


def fault_driver(plan_path: str) -> None:
    """Run plan.json: a reference run, then for each case (save, step, swap) a run killed just before
    that step of that save, what a user then finds in RUN/model, and the run resumed (or, for save 1,
    restarted). Writes results.json beside the plan. Runs in its own process (module docstring).
    """
    import shutil

    import duoclass
    from duoclass.artifacts import atomic
    from duoclass.artifacts import folder as checkpoint
    from duoclass.cli import commands as cli

    plan = json.loads(Path(plan_path).read_text())
    root, train = Path(plan["root"]), plan["train"]
    ref = root / "ref" / "run"
    box: dict[str, Any] = {"save": 0, "step": None, "kill": None, "swap": plan["swap"], "steps": {}, "run": None}

    def counted(name: str, fn: Any) -> Any:
        def step(*args: Any, **kw: Any) -> Any:
            if name == "_exchange" and box["swap"] == "rename":  # as on a system without an atomic exchange
                return False
            if box["step"] is not None:
                if box["kill"] == [box["save"], box["step"]]:
                    os._exit(137)
                box["steps"].setdefault(box["save"], []).append(_label(name, args, box["run"]))
                box["step"] += 1
            return fn(*args, **kw)
        return step

    for name in ("_mkdir", "_write_file", "_rename", "_exchange", "_rmtree"):
        setattr(atomic, name, counted(name, getattr(atomic, name)))
    os.fsync = counted("fsync", os.fsync)
    replace = checkpoint.replace_folder

    def replace_counted(folder: Path, blobs: dict, verifies) -> None:
        box["save"] += 1
        box["step"] = 0
        replace(folder, blobs, verifies)
        if box["kill"] == [box["save"], box["step"]]:
            os._exit(137)
        box["steps"].setdefault(box["save"], []).append("done")
        box["step"] = None
        if box["run"] == ref:  # the reference keeps the folder as each save left it
            shutil.copytree(folder, root / "ref" / f"after-save-{box['save']}")

    checkpoint.replace_folder = replace_counted

    def fork(argv: list[str], run: Path, log: Path, kill: list[int] | None = None, swap: str = "exchange") -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                box.update(save=0, step=None, kill=kill, swap=swap, steps={}, run=run)
                code = cli.main(argv)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def case(save: int, step: int, swap: str) -> dict[str, Any]:
        run = root / f"save{save}-{swap}-{step}" / "run"
        run.parent.mkdir(parents=True)
        out: dict[str, Any] = {"killed": fork(["train", *train, "--output", str(run)], run, run.parent / "killed.log", [save, step], swap)}
        # what a user finds after the kill (loaded from a copy, so that the resume meets the raw state)
        copy = run.parent / "copy"
        shutil.copytree(run, copy, symlinks=True)
        old, new = root / "ref" / f"after-save-{save - 1}", root / "ref" / f"after-save-{save}"
        try:
            duoclass.load(copy / "model", device="cpu")
            found = _files(copy / "model")
            out["folder"] = "old" if found == _files(old) else "new" if found == _files(new) else "mixed"
        except Exception as e:
            out["folder"] = "none" if not old.is_dir() and not (copy / "model").exists() else f"unloadable ({e})"
        # save 1 comes before the first state.pt: the run starts again instead of resuming
        again = ["train", "--resume", str(run)] if save > 1 else ["train", *train, "--output", str(run)]
        out["resumed"] = fork(again, run, run.parent / "resume.log", swap=swap)
        log = (run.parent / "resume.log").read_text()
        out["log_tail"] = log[-800:]
        out["kept_vocabulary"] = "resume: keeping the" in log
        if out["resumed"] == 0:
            out["summary_equal"] = _final(run) == _final(ref)
            out["history_equal"] = _history(run) == _history(ref)
            out["folder_equal"] = _files(run / "model") == _files(ref / "model")
            out["leftovers"] = sorted(p.name for p in run.glob(".model*"))
        return out

    # the reference: uninterrupted, in this process (which also warms every lazy import for the forks)
    box.update(run=ref)
    code = cli.main(["train", *train, "--output", str(ref)])
    box["run"] = None
    results: dict[str, Any] = {"ref_code": code, "steps": box["steps"], "cases": {}}
    # each case in a worker of its own, two at a time (the runs themselves use one thread)
    todo, running = list(plan["cases"]), {}
    while todo or running:
        while todo and len(running) < plan.get("jobs", 2):
            save, step, swap = todo.pop(0)
            name = f"save{save}-{swap}-{step}"
            pid = os.fork()
            if pid == 0:
                try:
                    out = case(save, step, swap)
                    shutil.rmtree(root / name)
                except BaseException:
                    import traceback

                    out = {"error": traceback.format_exc()}
                (root / f"{name}.json").write_text(json.dumps(out))
                os._exit(0)
            running[pid] = name
        pid, _ = os.wait()
        name = running.pop(pid)
        result = root / f"{name}.json"
        results["cases"][name] = json.loads(result.read_text()) if result.is_file() else {"error": "the case worker died"}
    (Path(plan_path).parent / "results.json").write_text(json.dumps(results, indent=1))


def run_faults(root: Path, train: list[str], swap: str, cases: list[tuple[int, int, str]]) -> dict:
    """fault_driver in a subprocess; its results (see there)."""
    root.mkdir(parents=True, exist_ok=True)
    plan = root / "plan.json"
    jobs = min(2, os.cpu_count() or 1)
    plan.write_text(json.dumps({"root": str(root), "train": train, "swap": swap, "cases": cases, "jobs": jobs}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    code = "import sys; from tests.test_resume import fault_driver; fault_driver(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(plan)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


def check_case(case: dict, step: str) -> None:
    assert "error" not in case, case.get("error")
    assert case.get("killed") == 137, f"not killed before {step!r}: {case}"
    assert case["folder"] in ("old", "new", "none"), f"killed before {step!r}, RUN/model is {case['folder']}"
    assert case["resumed"] == 0, case["log_tail"]
    assert case["summary_equal"] and case["history_equal"], f"killed before {step!r}: metrics differ from the uninterrupted run"
    assert case["folder_equal"], f"killed before {step!r}: the final model folder differs from the uninterrupted run's"
    assert case["leftovers"] == [], f"killed before {step!r}: temporary folders left behind: {case['leftovers']}"


with __import__("tempfile").TemporaryDirectory() as _probe:
    SWAP = "exchange" if exchange_works(Path(_probe)) else "rename"  # what a save on this machine uses
OTHER = "rename" if SWAP == "exchange" else None  # the fallback can be forced; the exchange cannot
needs_fork = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/fd").is_dir(),
                                reason="the save-fault runs fork from one process and name fds through /proc (Linux)")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy(tmp_path_factory.mktemp("faults") / "toy", 60, 20)


@pytest.fixture(scope="module")
def text_faults(text_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Save 2 of a tfidf-mlp run killed before each of its steps, each then resumed."""
    steps = save_steps(TEXT_FILES, SWAP)
    return run_faults(tmp_path_factory.mktemp("text-faults"), [str(text_data), *TEXT_ARGS, *COMMON], SWAP,
                      [(2, i, SWAP) for i in range(len(steps))])


@pytest.mark.slow  # long: runs with `make test-slow`
@needs_fork
def test_the_fault_runs_cover_every_save_step(text_faults: dict) -> None:
    """The reference run counted exactly the steps the kills are parametrized over."""
    assert text_faults["ref_code"] == 0
    assert text_faults["steps"]["1"] == save_steps(TEXT_FILES, SWAP, first=True)
    for save in ("2", "3", "4"):
        assert text_faults["steps"][save] == save_steps(TEXT_FILES, SWAP), save
    assert sorted(text_faults["steps"]) == ["1", "2", "3", "4"]


@needs_fork
@pytest.mark.parametrize("i,step", list(enumerate(save_steps(TEXT_FILES, SWAP))),
                         ids=[f"{i:02d}-{s}" for i, s in enumerate(save_steps(TEXT_FILES, SWAP))])
def test_kill_at_a_save_step_then_resume_matches_uninterrupted(text_faults: dict, i: int, step: str) -> None:
    case = text_faults["cases"][f"save2-{SWAP}-{i}"]
    check_case(case, step)
    assert case["folder"] == expected_folder(save_steps(TEXT_FILES, SWAP), i)
    assert case["kept_vocabulary"], "the resumed text run rebuilt its vocabulary instead of reading RUN/model"


def _slow_cases(files: list[str]) -> list[tuple[int, int, str]]:
    cases = [(1, i, SWAP) for i in range(len(save_steps(files, SWAP, first=True)))]
    cases += [(4, i, SWAP) for i in range(len(save_steps(files, SWAP)))]
    if OTHER:
        cases += [(s, i, OTHER) for s in (2, 4) for i in range(len(save_steps(files, OTHER)))]
    return cases


def _check_slow(results: dict, files: list[str]) -> None:
    for save, step, swap in _slow_cases(files):
        steps = save_steps(files, swap, first=save == 1)
        case = results["cases"][f"save{save}-{swap}-{step}"]
        check_case(case, f"{steps[step]} (save {save}, {swap})")
        assert case["folder"] == expected_folder(steps, step, first=save == 1), (save, steps[step], case["folder"])


@needs_fork
@pytest.mark.slow
def test_kill_at_every_step_of_every_kind_of_save_text(text_data: Path, tmp_path: Path) -> None:
    """The first save (no folder yet, no state.pt: the run is started again), the final metrics
    update, and the two-rename swap; the fast test above covers save 2 with this machine's swap."""
    results = run_faults(tmp_path, [str(text_data), *TEXT_ARGS, *COMMON], SWAP, _slow_cases(TEXT_FILES))
    _check_slow(results, TEXT_FILES)
    for name, case in results["cases"].items():
        assert case["kept_vocabulary"] or name.startswith("save1-"), name


def write_shapes(root: Path, n: int = 24) -> Path:
    """A 3-class ImageFolder of 16 px PNGs (a bright square top-left, bottom-right, or none) in train/ and test/."""
    import random

    rng = random.Random(0)
    for split, count in (("train", n), ("test", n // 3)):
        for label in ("none", "top", "bottom"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                im = Image.new("RGB", (16, 16), tuple(rng.randrange(0, 60) for _ in range(3)))
                if label != "none":
                    x = 2 if label == "top" else 9
                    im.paste((230, 230, 230), (x, x, x + 5, x + 5))
                im.save(root / split / label / f"{k:02d}.png")
    return root


@needs_fork
@pytest.mark.slow
def test_kill_at_every_save_step_image(tmp_path: Path) -> None:
    data = write_shapes(tmp_path / "shapes")
    cases = [(2, i, SWAP) for i in range(len(save_steps(IMAGE_FILES, SWAP)))] + _slow_cases(IMAGE_FILES)
    results = run_faults(tmp_path / "faults", [str(data), *IMAGE_ARGS, *COMMON], SWAP, cases)
    assert results["steps"]["2"] == save_steps(IMAGE_FILES, SWAP)
    steps = save_steps(IMAGE_FILES, SWAP)
    for i, label in enumerate(steps):
        check_case(results["cases"][f"save2-{SWAP}-{i}"], label)
        assert results["cases"][f"save2-{SWAP}-{i}"]["folder"] == expected_folder(steps, i), label
    _check_slow(results, IMAGE_FILES)
