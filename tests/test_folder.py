"""The model folder format (duoclass.checkpoint): integrity of every file, the config schema,
the one-step folder replace and its recovery, format 1 folders, and file permissions.

Folders here hold a real msresnet-tiny and load through `duoclass.load` and the CLI, as a user's would.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import duoclass
from duoclass.artifacts import atomic
from duoclass.artifacts.state import save_state
from duoclass.artifacts import folder as checkpoint
from duoclass.cli import commands as cli
from duoclass.artifacts.folder import config_digest, model_folder_config, read_model_config, read_model_folder, recover_model_folder, save_model_folder, update_model_folder, update_model_folder_metrics
from duoclass.errors import DuoclassError
from duoclass.models import create_model

CLASSES = ["cat", "dog", "owl"]
IMAGE_PRE = {"image_size": 16, "resize": "bilinear-square", "scale": "0-1", "channels": "RGB"}


def config(**over) -> dict:
    args = dict(task="image", model_name="msresnet-tiny", model_args={"image_size": 16}, classes=CLASSES,
                preprocessing=IMAGE_PRE, evaluation={"tta": False, "top_k": 3},
                inputs={"pixel_values": {"dtype": "float32", "shape": ["batch", 3, 16, 16], "range": [0.0, 1.0]}},
                training={"seed": 0, "epochs": 1})
    args.update(over)
    return model_folder_config(**args)


def save(folder: Path, seed: int = 0, metrics: dict | None = None, **over) -> Path:
    torch.manual_seed(seed)
    model = create_model("msresnet-tiny", len(CLASSES), image_size=16)
    return save_model_folder(folder, model.state_dict(), config(**over), metrics={"epoch": seed} if metrics is None else metrics)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return save(tmp_path / "run" / "model")


def edit_config(folder: Path, change) -> None:  # noqa: ANN001
    p = folder / "config.json"
    cfg = json.loads(p.read_text(encoding="utf-8"))
    change(cfg)
    p.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def reseal(cfg: dict) -> None:
    """What a deliberate edit would also have to do: recompute the config's own digest."""
    cfg["config_sha256"] = config_digest(cfg)


def error_of(folder: Path) -> str:
    with pytest.raises(DuoclassError) as e:
        duoclass.load(folder, device="cpu")
    return str(e.value)


def weights_of(folder: Path) -> torch.Tensor:
    """All the weights as one vector (tensors in key order)."""
    state = read_model_folder(folder)[1]
    return torch.cat([state[k].flatten().float() for k in sorted(state)])


# --- integrity: every file, config.json included ------------------------------------------------
def test_a_saved_folder_loads_and_lists_every_file(folder: Path) -> None:
    clf = duoclass.load(folder, device="cpu")
    assert clf.classes_.tolist() == CLASSES
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["config_sha256"] == config_digest(cfg)
    assert set(cfg["files"]) == {"model.safetensors", "metrics.json"}
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]


@pytest.mark.parametrize("edit", ["class-name", "image-size", "tta", "files-entry"])
def test_a_hand_edited_config_is_refused(folder: Path, edit: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    changes = {
        "class-name": lambda c: c["classes"].__setitem__(0, "tiger"),  # predict would print the wrong name
        "image-size": lambda c: c["preprocessing"].__setitem__("image_size", 32),  # silently other probabilities
        "tta": lambda c: c["evaluation"].__setitem__("tta", True),
        "files-entry": lambda c: c["files"].pop("metrics.json"),
    }
    edit_config(folder, changes[edit])
    msg = error_of(folder)
    assert str(folder / "config.json") in msg and "checksum mismatch" in msg and "copy the model folder again" in msg
    png = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(png)
    assert cli.main(["predict", str(folder), str(png)]) == 2  # the CLI: one error line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {msg}"]


def test_reformatting_config_json_keeps_it_valid(folder: Path) -> None:
    """The digest covers the content (canonical JSON), not the layout: re-indenting is no edit."""
    p = folder / "config.json"
    p.write_text(json.dumps(json.loads(p.read_text()), indent=None, sort_keys=True), encoding="utf-8")
    assert duoclass.load(folder, device="cpu").classes_.tolist() == CLASSES


def test_edited_metrics_are_refused(folder: Path) -> None:
    (folder / "metrics.json").write_text(json.dumps({"epoch": 1, "test": {"accuracy": 0.99}}))
    msg = error_of(folder)
    assert str(folder / "metrics.json") in msg and "checksum mismatch" in msg


def test_an_unlisted_file_is_refused_but_hidden_clutter_is_ignored(folder: Path) -> None:
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "notes.txt").write_text("x")
    duoclass.load(folder, device="cpu")
    (folder / "sub").mkdir()
    (folder / "sub" / "added_tokens.json").write_text("{}")
    msg = error_of(folder)
    assert str(folder / "sub" / "added_tokens.json") in msg and "config.json does not list it" in msg and "remove it" in msg


# --- the schema ----------------------------------------------------------------------------------
BAD = {
    "duplicate class": (dict(classes=["cat", "cat"]), "names 'cat' twice"),
    "empty class": (dict(classes=["cat", ""]), "non-empty string"),
    "one class": (dict(classes=["cat"]), "at least 2"),
    "class not a string": (dict(classes=["cat", 3]), "non-empty string"),
    "task": (dict(task="audio"), "task 'audio' is not one of image, text"),
    "model name": (dict(model_name=""), "'model' needs a 'name'"),
    "image size": (dict(preprocessing={"image_size": "16"}), "'preprocessing.image_size' should be a positive integer"),
    "tokenizer": (dict(task="text", preprocessing={"tokenizer": "spacy", "max_length": 8}), "'preprocessing.tokenizer' 'spacy'"),
    "max length": (dict(task="text", preprocessing={"tokenizer": "ngram-hash", "max_length": 0}), "'preprocessing.max_length'"),
    "tokenizer outside": (dict(task="text", preprocessing={"tokenizer": "hf", "max_length": 8, "files": "../tok/"}),
                          "'preprocessing.files' '../tok/' is not a relative path inside"),
    "tta": (dict(evaluation={"tta": "no"}), "'evaluation.tta' should be true or false"),
    "top_k": (dict(evaluation={"top_k": True}), "'evaluation.top_k' should be a positive integer"),
    "evaluation key": (dict(evaluation={"tta": False, "beam": 3}), "'evaluation' has unknown key 'beam'"),
    "input dtype": (dict(inputs={"x": {"dtype": "float16", "shape": ["batch", 3]}}), "'inputs.x': dtype 'float16'"),
    "input shape": (dict(inputs={"x": {"dtype": "int64", "shape": ["batch", "width"]}}), "'inputs.x': shape"),
    "input keys": (dict(inputs={"x": {"dtype": "int64"}}), "'inputs.x' should be"),
    "training": (dict(training=["seed", 0]), "'training' should be a JSON object"),
}


@pytest.mark.parametrize("name", BAD)
def test_model_folder_config_refuses_what_the_schema_does_not_allow(name: str) -> None:
    over, words = BAD[name]
    with pytest.raises(DuoclassError, match="model folder config: ") as e:
        config(**over)
    assert words in str(e.value)


@pytest.mark.parametrize("name", ["duplicate class", "tta", "input shape"])
def test_loading_refuses_a_resealed_config_that_breaks_the_schema(folder: Path, name: str) -> None:
    """Even with a recomputed digest, a config outside the schema is an error naming the key."""
    over, words = BAD[name]
    key = {"duplicate class": "classes", "tta": "evaluation", "input shape": "inputs"}[name]
    value = over[key]

    def change(cfg: dict) -> None:
        cfg[key] = value
        reseal(cfg)

    edit_config(folder, change)
    msg = error_of(folder)
    assert str(folder / "config.json") in msg and words in msg and "copy the model folder again" in msg


@pytest.mark.parametrize("entry", ["../state.pt", "/etc/passwd", "a/../../b", "config.json", "C:/x"])
def test_files_entries_stay_inside_the_folder(folder: Path, entry: str) -> None:
    def change(cfg: dict) -> None:
        cfg["files"][entry] = "0" * 64
        reseal(cfg)

    edit_config(folder, change)
    assert f"'files' lists {entry!r}" in error_of(folder)


def test_unknown_top_level_key_is_refused(folder: Path) -> None:
    def change(cfg: dict) -> None:
        cfg["labels"] = ["a", "b"]
        reseal(cfg)

    edit_config(folder, change)
    assert "unknown key 'labels'" in error_of(folder)
    with pytest.raises(DuoclassError, match="written by save_model_folder itself"):
        save_model_folder(folder, {}, dict(config(), files={}))


def test_variants_live_inside_the_folder_and_are_hashed(folder: Path) -> None:
    onnx = b"not really onnx"
    update_model_folder(folder, files={"variants/model.onnx": onnx},
                        variants={"onnx": {"path": "variants/model.onnx", "format": "onnx", "opset": 17}})
    cfg = read_model_config(folder)
    assert cfg["variants"]["onnx"]["opset"] == 17
    assert cfg["files"]["variants/model.onnx"] == hashlib.sha256(onnx).hexdigest()
    duoclass.load(folder, device="cpu")
    (folder / "variants" / "model.onnx").write_bytes(b"swapped")
    assert "model.onnx: checksum mismatch" in error_of(folder)
    other = save(folder.parent / "other")
    for path, words in (("../model.onnx", "is not a relative path inside"), ("variants/gone.onnx", "is not among the folder's hashed files")):
        with pytest.raises(DuoclassError, match="'variants.int8': path") as e:
            update_model_folder(other, variants={"int8": {"path": path, "format": "onnx-int8"}})
        assert words in str(e.value)
    assert "variants" not in read_model_config(other)  # a refused update leaves the folder as it was


# --- metrics update -------------------------------------------------------------------------------
def test_update_metrics_keeps_the_folder_loadable(folder: Path) -> None:
    before = weights_of(folder)
    final = {"epoch": 3, "valid": {"accuracy": 0.9}, "test": {"accuracy": 0.8}}
    update_model_folder_metrics(folder, final)
    assert json.loads((folder / "metrics.json").read_text()) == final
    assert torch.equal(weights_of(folder), before)
    assert duoclass.load(folder, device="cpu").classes_.tolist() == CLASSES
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]  # no temporary sibling left


# --- format 1 --------------------------------------------------------------------------------------
def write_format1(folder: Path) -> None:
    """A folder as duoclass 0.1 wrote it: no config digest, metrics.json written later and not hashed."""
    from safetensors.torch import save as st_save

    folder.mkdir(parents=True)
    torch.manual_seed(1)
    raw = st_save(create_model("msresnet-tiny", len(CLASSES), image_size=16).state_dict())
    (folder / "model.safetensors").write_bytes(raw)
    cfg = {"format": "duoclass-model", "format_version": 1, "task": "image",
           "model": {"name": "msresnet-tiny", "args": {"image_size": 16}}, "classes": CLASSES,
           "preprocessing": IMAGE_PRE, "training": {"data": "x", "seed": 0, "epochs": 1},
           "versions": {"duoclass": "0.1.0", "torch": "2.5.0"}, "files": {"model.safetensors": hashlib.sha256(raw).hexdigest()}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "metrics.json").write_text(json.dumps({"epoch": 1, "valid": {}, "test": {}}))


def test_format1_folders_still_load_and_update_to_format2(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write_format1(folder)
    assert duoclass.load(folder, device="cpu").classes_.tolist() == CLASSES
    update_model_folder_metrics(folder, {"epoch": 1, "test": {"accuracy": 0.5}})
    cfg = read_model_config(folder)
    assert cfg["format_version"] == 2 and "metrics.json" in cfg["files"] and cfg["training"]["seed"] == 0
    edit_config(folder, lambda c: c["classes"].reverse())
    assert "checksum mismatch" in error_of(folder)  # now covered like any format 2 folder


# --- one-step replace ----------------------------------------------------------------------------
def test_a_save_replaces_the_whole_folder(folder: Path) -> None:
    (folder.parent / ".model.duoclass-new").mkdir()  # what a save killed half-way leaves
    (folder.parent / ".model.duoclass-new" / "model.safetensors").write_bytes(b"torn")
    save(folder, seed=5, classes=["a", "b", "c"])
    assert read_model_config(folder)["classes"] == ["a", "b", "c"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]


@pytest.mark.parametrize("new_complete", [True, False])
def test_a_crash_between_the_two_renames_is_recovered(tmp_path: Path, new_complete: bool) -> None:
    """Where the OS has no atomic exchange, a save renames old away, then new in. A crash between
    them leaves no folder; the next read finishes the swap (new if it verifies, else back to old)."""
    run = tmp_path / "run"
    old, new = save(run / ".model.duoclass-old", seed=1), save(tmp_path / "elsewhere", seed=2)
    if not new_complete:
        (new / "metrics.json").write_bytes(b"torn")
    os.rename(new, run / ".model.duoclass-new")
    expected = weights_of(run / ".model.duoclass-new") if new_complete else weights_of(old)
    folder = run / "model"
    assert torch.equal(weights_of(folder), expected)  # any reader repairs it first
    assert (run / ("model" if new_complete else ".model.duoclass-new")).is_dir()
    save(folder, seed=3)  # and the next save clears what is left
    assert sorted(p.name for p in run.iterdir()) == ["model"]


def test_recover_is_a_no_op_on_a_healthy_or_absent_folder(folder: Path, tmp_path: Path) -> None:
    assert recover_model_folder(folder)
    assert not recover_model_folder(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_the_two_rename_swap_gives_the_same_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for systems without an atomic exchange (macOS, Windows, some filesystems)."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    save(folder, seed=7)
    assert torch.equal(weights_of(folder), weights_of(save(folder.parent / "same", seed=7)))
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model", "same"]


def contents(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` (relative path -> bytes); None when there is no folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else None


class Crash(Exception):
    """A crash, simulated: raised by a wrapped step of the swap."""


def swap_steps(monkeypatch: pytest.MonkeyPatch, run: Path, each: Any) -> list[str]:
    """Force the two-rename swap and call `each(label, when)` before and after every _rename and _rmtree;
    returns the labels ('rename model .model.duoclass-old'), and `exchange` when _exchange was asked."""
    steps: list[str] = []
    real = {name: getattr(atomic, name) for name in ("_rename", "_rmtree")}

    def no_exchange(a: Path, b: Path) -> bool:
        steps.append("exchange")
        return False  # as on macOS, Windows and filesystems without renameat2

    def wrap(name: str) -> Any:
        def step(*args: Path) -> None:
            label = " ".join([name.strip("_")] + [os.path.relpath(a, run) for a in args])
            each(label, "before")
            steps.append(label)
            real[name](*args)
            each(label, "after")
        return step

    monkeypatch.setattr(atomic, "_exchange", no_exchange)
    for name in real:
        monkeypatch.setattr(atomic, name, wrap(name))
    return steps


def test_the_two_rename_swap_keeps_the_old_folder_until_the_new_one_is_in_place(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: on the two-rename path (no atomic exchange), a kill at the moment of any rename or delete of a
    save leaves a run folder whose next read gives the old folder complete (before the swap began) or the new
    one complete (once the old one is parked as .model.duoclass-old), never nothing and never a mix."""
    run = folder.parent
    old, new = contents(folder), contents(save(tmp_path / "expected" / "model", seed=2))
    assert old != new
    probing: list[bool] = []
    kills: list[tuple[str, str, str]] = []

    def kill_now(label: str, when: str) -> None:
        """What a kill at this moment leaves, read the way the next process reads it (on a copy)."""
        if probing:  # the read below recovers through the same helpers
            return
        probing.append(True)
        n = len(steps)
        try:
            copy = tmp_path / f"kill-{len(kills)}" / "run"
            shutil.copytree(run, copy, symlinks=True)
            try:
                read_model_folder(copy / "model")
                found = contents(copy / "model")
                got = "old" if found == old else "new" if found == new else f"a mix: {sorted(found or {})}"
            except DuoclassError as e:
                got = f"nothing ({e})"
            expected = "old" if not [s for s in steps if s != "exchange"] else "new"  # the swap has begun
            kills.append((f"{when} {label}", expected, got))
        finally:
            del steps[n:]  # the probe's own recovery is no step of the save
            probing.clear()

    steps = swap_steps(monkeypatch, run, kill_now)
    save(folder, seed=2)
    assert "exchange" in steps and "rename .model.duoclass-new model" in steps  # the two-rename path ran
    assert kills and all(got == expected for _, expected, got in kills), "\n".join(f"kill {m}: {g} (expected {e})" for m, e, g in kills)
    assert kills[0][1] == "old" and kills[-1][1] == "new"
    assert contents(folder) == new and sorted(p.name for p in run.iterdir()) == ["model"]


@pytest.mark.parametrize("after", [0, 1, 2, 3], ids=["before-the-first-step", "after-step-1", "after-step-2", "after-step-3"])
def test_a_crash_during_the_two_rename_swap_leaves_a_folder_that_reads(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Holds: where there is no atomic exchange, a save that dies (an exception here) before its first
    rename or delete leaves the old folder; one that dies after any of them (the first rename included)
    leaves a folder that the next read (recover_folder) gives complete and new; the next save then works."""
    run = folder.parent
    old, new = contents(folder), contents(save(tmp_path / "expected" / "model", seed=2))
    done: list[str] = []

    def counted(label: str, when: str) -> None:
        if when == "after":
            done.append(label)
        if (when == "before" and after == 0 and not done) or (when == "after" and len(done) == after):
            raise Crash(f"{when} {label}")

    swap_steps(monkeypatch, run, counted)
    with pytest.raises(Crash):
        save(folder, seed=2)
    monkeypatch.undo()  # the next process: the real helpers (the exchange included)
    read_model_folder(folder)  # recovers first, as every reader
    assert contents(folder) == (old if after == 0 else new), f"crash after {done}"
    save(folder, seed=3)
    assert contents(folder) == contents(save(tmp_path / "expected3" / "model", seed=3))
    assert sorted(p.name for p in run.iterdir()) == ["model"]


# --- permissions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)],
                         ids=["umask-022", "umask-002", "umask-077"])
def test_files_follow_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        folder = save(tmp_path / "run" / "model")
        update_model_folder(folder, files={"tokenizer/vocab.txt": b"a\n"})
        save_state(tmp_path / "run" / "state.pt", {"epoch": 1})
        atomic.atomic_write_json(tmp_path / "run" / "metrics.json", {})
    finally:
        os.umask(old)
    for p in [tmp_path / "run" / "state.pt", tmp_path / "run" / "metrics.json", *[q for q in folder.rglob("*") if q.is_file()]]:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p
    for d in (folder, folder / "tokenizer"):
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode, d
