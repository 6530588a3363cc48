"""What a new user does by mistake must never damage the system or lose a row.

- an output path that is a symlink (`/dev/stdout` as root) is written through, never replaced; `-` is stdout;
- an empty text in a prediction CSV keeps its row, its 0-based id and gets a warning, with or without an
  `id` column, and the same holds for the Python API.
"""
from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

import pytest

import duoclass
from duoclass.cli import commands as cli

from .conftest import run_cli
from .test_text import FAST, make_toy

pytestmark = pytest.mark.timeout(300)

FOUR_ROWS = 'text\nhi there\n""\n""\nsee you at 5\n'  # what pandas writes for ["hi there", "", "", "see you at 5"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("newuser")
    clf = duoclass.train(make_toy(root / "toy", 80, 20), model="tfidf-mlp", epochs=1, output=str(root / "run"), **FAST)
    return Path(clf.result_.model_dir)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# --- outputs --------------------------------------------------------------------------------
def test_symlinked_output_is_written_through(text_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in.csv"
    src.write_text(FOUR_ROWS, encoding="utf-8")
    target = tmp_path / "real" / "predictions.csv"
    target.parent.mkdir()
    target.write_text("old content\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert cli.main(["predict", str(text_model), str(src), "--output", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [r["id"] for r in _rows(target.read_text())] == ["0", "1", "2", "3"]
    # a dangling link: the file it names is created, the link kept
    gone = tmp_path / "real" / "new.csv"
    link2 = tmp_path / "link2.csv"
    link2.symlink_to(gone)
    assert cli.main(["predict", str(text_model), str(src), "--output", str(link2)]) == 0
    assert link2.is_symlink() and gone.is_file() and len(_rows(gone.read_text())) == 4


def test_output_to_a_pipe_writes_into_it(tmp_path: Path) -> None:
    """A FIFO (like a device or /dev/stdout's pipe) cannot be renamed over: it is written to directly, and stays a FIFO."""
    import stat
    import threading

    from duoclass.artifacts.atomic import atomic_write_text

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write_text(fifo, "x\n")
    reader.join(10)
    assert got == [b"x\n"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(duoclass.DuoclassError, match="is a folder"):
        atomic_write_text(tmp_path, "x\n")


@pytest.mark.parametrize("out", ["-", "/dev/stdout", "link"])
def test_output_to_stdout_prints_the_csv(text_model: Path, tmp_path: Path, out: str) -> None:
    src = tmp_path / "in.csv"
    src.write_text(FOUR_ROWS, encoding="utf-8")
    if out == "link":  # the same shape as /dev/stdout (a symlink to /proc/self/fd/1), in a folder of our own
        (tmp_path / "out.csv").symlink_to("/proc/self/fd/1")
        out = str(tmp_path / "out.csv")
    was_link = os.path.islink("/dev/stdout")
    r = run_cli("predict", str(text_model), str(src), "--output", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [row["id"] for row in _rows(r.stdout)] == ["0", "1", "2", "3"]  # only the CSV is on stdout
    assert "wrote 4 predictions" in r.stderr
    assert not (tmp_path / "-").exists()
    assert os.path.islink("/dev/stdout") == was_link
    if out.endswith("out.csv"):
        assert (tmp_path / "out.csv").is_symlink()


def test_csv_has_unix_line_ends(text_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(FOUR_ROWS, encoding="utf-8")
    assert cli.main(["predict", str(text_model), str(src), "--output", str(tmp_path / "o.csv")]) == 0
    assert b"\r\n" not in (tmp_path / "o.csv").read_bytes()


# --- no row lost ------------------------------------------------------------------------------
@pytest.mark.parametrize("content,ids", [
    (FOUR_ROWS, ["0", "1", "2", "3"]),
    ('id,text\na,hi there\nb,""\nc,\nd,see you at 5\n', ["a", "b", "c", "d"]),
    ("text\nhi there\n\n\nsee you at 5\n\n", ["0", "1", "2", "3"]),  # hand-made: blank lines inside are rows, a trailing one is not
], ids=["pandas", "id-column", "blank-lines"])
def test_empty_texts_keep_their_rows(text_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     content: str, ids: list[str]) -> None:
    src = tmp_path / "in.csv"
    src.write_text(content, encoding="utf-8")
    out = tmp_path / "o.csv"
    assert cli.main(["predict", str(text_model), str(src), "--output", str(out)]) == 0
    rows = _rows(out.read_text())
    assert [r["id"] for r in rows] == ids
    assert all(r["label"] in ("pos", "neg") for r in rows)
    assert ["empty text" in r["warning"] for r in rows] == [False, True, True, False]
    assert "2 rows have empty text" in caplog.text


def test_python_api_keeps_empty_texts(text_model: Path) -> None:
    clf = duoclass.load(text_model, device="cpu")
    res = clf.predict_results(["hi there", "", "", "see you at 5"])
    assert len(res) == 4 and all(r.ok for r in res)
    assert ["empty text" in (r.warning or "") for r in res] == [False, True, True, False]
    assert len(clf.predict(["hi there", "", "", "see you at 5"])) == 4


def test_training_still_skips_empty_rows_and_counts_them(tmp_path: Path) -> None:
    """keep_blank_rows is for prediction only: a training CSV's empty rows are skipped and listed."""
    from duoclass.data.tables import read_table

    p = tmp_path / "t.csv"
    p.write_text(FOUR_ROWS, encoding="utf-8")
    assert len(read_table(p)[1]) == 2
    assert len(read_table(p, keep_blank_rows=True)[1]) == 4


# --- data the model cannot read, or that leaks ------------------------------------------------
def test_a_tokenizer_that_does_not_cover_the_data_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """An English vocabulary on Chinese reviews maps most tokens to [UNK]: a warning names the share and the fix;
    English text with the same tokenizer gets none."""
    from duoclass.preprocess.text import TextPreprocessor
    from duoclass.training.text_data import TextDataset, train_tokenizer, warn_unknown_tokens

    from .test_text import toy_rows

    tok, _ = train_tokenizer([r[1] for r in toy_rows(160, "train", 0)], vocab_size=200)
    pre = TextPreprocessor("hf", 32, True, tok, "trained")
    chinese = TextDataset(pre.encode(["房间很干净，服务也很好", "早餐一般，隔音很差"] * 5), [0, 1] * 5)
    english = TextDataset(pre.encode([r[1] for r in toy_rows(10, "x", 3)]), [0, 1] * 5)
    caplog.set_level("WARNING", logger="duoclass")
    assert warn_unknown_tokens(pre, english, "m") == 0.0 and not caplog.records
    share = warn_unknown_tokens(pre, chinese, "hf:english-model")
    assert share > 0.5
    assert "hf:english-model" in caplog.text and "unknown to its tokenizer" in caplog.text and "albert-scratch" in caplog.text


def test_texts_shared_between_train_and_test_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Verbatim duplicates between train and test (13% of the SMS spam test split) are counted and named."""
    from .test_text import toy_rows, write_csv

    train = toy_rows(60, "train", 0)
    test = toy_rows(10, "test", 2) + [("dup-1", train[3][1], train[3][2]), ("dup-2", train[8][1], train[8][2])]
    write_csv(tmp_path / "d" / "train.csv", train)
    write_csv(tmp_path / "d" / "valid.csv", toy_rows(20, "valid", 1))
    write_csv(tmp_path / "d" / "test.csv", test)
    caplog.set_level("WARNING", logger="duoclass")
    duoclass.train(tmp_path / "d", model="tfidf-mlp", epochs=1, output=str(tmp_path / "run"), **FAST)
    hits = [r.getMessage() for r in caplog.records if "verbatim" in r.getMessage()]
    assert any(m.startswith("2 of 12 test texts") for m in hits), hits
    assert not any(" valid texts" in m for m in hits), hits


def test_training_into_an_earlier_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    """A second run into the same --output is refused with the ways out; --overwrite replaces it, and the
    TensorBoard folder then holds this run's curves alone."""
    data = make_toy(tmp_path / "toy", 40, 10)
    run = tmp_path / "run"
    settings = dict(FAST, tensorboard=True)
    duoclass.train(data, model="tfidf-mlp", epochs=1, output=str(run), **settings)
    first = sorted(p.name for p in (run / "tensorboard").iterdir())
    with pytest.raises(duoclass.DuoclassError, match=r"holds an earlier run; pass --overwrite to replace it, --resume .* to continue it"):
        duoclass.train(data, model="tfidf-mlp", epochs=1, output=str(run), **settings)
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == first  # nothing touched
    duoclass.train(data, model="tfidf-mlp", epochs=1, output=str(run), overwrite=True, **settings)
    again = sorted(p.name for p in (run / "tensorboard").iterdir())
    assert len(again) == len(first) == 1 and again != first  # the old event file is gone, one new one


def test_a_run_folder_given_as_model_folder_says_which_to_use(text_model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    run = text_model.parent
    src = tmp_path / "in.csv"
    src.write_text(FOUR_ROWS, encoding="utf-8")
    assert cli.main(["predict", str(run), str(src), "--output", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run}: a run folder, not a model folder; did you mean {run / 'model'}?"]


def test_a_folder_of_class_folders_is_evaluated_whole(digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`evaluate MODEL xrays/test` (class folders, no split folders) evaluates that folder, labelled 'test'."""
    clf = duoclass.train(digits, model="msresnet-tiny", image_size=16, epochs=1, output=str(tmp_path / "run"), **FAST)
    whole = clf.evaluate(digits, split="test")
    m = clf.evaluate(digits / "test")
    assert m["split"] == "test" and m["n"] == whole["n"] and m["accuracy"] == whole["accuracy"]
    assert cli.main(["evaluate", str(clf.folder), str(digits / "test")]) == 0
    assert capsys.readouterr().out.startswith(f"test: n={whole['n']}")
    import shutil

    shutil.copytree(digits / "test", tmp_path / "holdout")
    assert clf.evaluate(tmp_path / "holdout")["split"] == "all"


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path: Path) -> None:
    """Holds: a regular file is replaced atomically (temp file, then rename), so a write that fails part-way
    leaves the old content whole and no temp file; the new content arrives as a new file (new inode)."""
    from duoclass.artifacts.atomic import atomic_write, atomic_write_text

    target = tmp_path / "predictions.csv"
    target.write_text("old\n")
    inode = target.stat().st_ino

    def half(f) -> None:
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.csv", half)  # a file that did not exist yet: it still does not
    assert not (tmp_path / "new.csv").exists()
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and target.stat().st_ino != inode


def test_only_dash_and_the_real_stdout_count_as_stdout(tmp_path: Path) -> None:
    from duoclass.artifacts.atomic import is_stdout

    assert is_stdout("-") and not is_stdout(None) and not is_stdout("")
    for name in ("+out.csv", ",x", "--", "- ", str(tmp_path / "o.csv"), str(tmp_path)):
        assert not is_stdout(name), name


# --- data of the wrong kind, files that are not images -----------------------------------------
@pytest.fixture(scope="module")
def image_model(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("newuser-img")
    return Path(duoclass.train(digits, model="msresnet-tiny", image_size=16, epochs=1, output=str(out / "run"), **FAST).result_.model_dir)


def _err(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_data_of_the_wrong_kind_says_which_kind_the_model_is(image_model: Path, text_model: Path, digits: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts = tmp_path / "texts.csv"
    texts.write_text(FOUR_ROWS, encoding="utf-8")
    out = ["--output", str(tmp_path / "o.csv")]
    assert "holds texts (a 'text' column), and this is an image model" in _err(capsys, ["predict", str(image_model), str(texts), *out])
    assert "holds images, and this is a text model" in _err(capsys, ["predict", str(text_model), str(digits / "test"), *out])
    toy = make_toy(tmp_path / "toy", 20, 6)
    line = _err(capsys, ["train", str(toy), "--model", "msresnet", "--output", str(tmp_path / "r1")])
    assert "--model msresnet: an image model, but" in line and "holds text data" in line
    line = _err(capsys, ["train", str(digits), "--model", "tfidf-mlp", "--output", str(tmp_path / "r2")])
    assert "--model tfidf-mlp: a text model, but" in line and "holds image data" in line
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_files_that_are_not_images_keep_their_rows(image_model: Path, digits: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    folder = tmp_path / "scans"
    shutil.copytree(digits / "test" / "0", folder)
    (folder / "scan.dcm").write_bytes(b"DICM" + b"\x00" * 200)
    (folder / "README").write_text("notes")
    (folder / ".DS_Store").write_bytes(b"\x00")
    out = tmp_path / "o.csv"
    assert cli.main(["predict", str(image_model), str(folder), "--output", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in _rows(out.read_text())}
    assert rows["scan.dcm"]["error"] and rows["scan.dcm"]["label"] == "" and rows["README"]["error"]
    assert ".DS_Store" not in rows and sum(1 for r in rows.values() if not r["error"]) == len(list((digits / "test" / "0").iterdir()))
    assert "2 of" in caplog.text and ".dcm: 1" in caplog.text and "no extension: 1" in caplog.text


def test_a_duplicate_or_empty_id_does_not_refuse_the_prediction(text_model: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,text\n7,good film\n,bad film\n7,great film\n9,awful film\n", encoding="utf-8")
    out = tmp_path / "o.csv"
    assert cli.main(["predict", str(text_model), str(src), "--output", str(out)]) == 0
    assert [r["id"] for r in _rows(out.read_text())] == ["7", "", "7", "9"]  # every row, in input order
    assert "1 row has an empty id (e.g. line 3)" in caplog.text and "'7' (lines 2 and 4)" in caplog.text


def test_manifest_columns_are_remembered(digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """After `train manifest.csv --path-column filename --label-column diagnosis`, evaluate and predict take the
    same manifest without the flags (they are in the model folder's preprocessing record)."""
    import csv as csv_module

    rows = [(str(p), p.parent.name, split) for split in ("train", "test") for p in sorted((digits / split).rglob("*.png"))]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv_module.writer(f)
        w.writerow(["filename", "diagnosis", "split"])
        w.writerows(rows)
    run = tmp_path / "run"
    assert cli.main(["train", str(manifest), "--path-column", "filename", "--label-column", "diagnosis", "--model",
                     "msresnet-tiny", "--image-size", "16", "--epochs", "1", "--device", "cpu", "--no-progress",
                     "--no-tensorboard", "--output", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(run / "model"), str(manifest)]) == 0
    assert capsys.readouterr().out.startswith("test: n=")
    out = tmp_path / "p.csv"
    assert cli.main(["predict", str(run / "model"), str(manifest), "--output", str(out)]) == 0
    assert len(_rows(out.read_text())) == len(rows) and not any(r["error"] for r in _rows(out.read_text()))


# --- papercuts --------------------------------------------------------------------------------
def test_integer_like_labels_sort_as_numbers() -> None:
    from duoclass.data.splits import class_order

    assert class_order(["1", "10", "11", "2", "2"]) == ["1", "2", "10", "11"]
    assert class_order(["b", "a", "10", "2"]) == ["10", "2", "a", "b"]  # not all numbers: as text


def test_predict_reads_a_txt_file_of_one_text_per_line(text_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "posts.txt"
    src.write_text("good film\n\nawful film\n", encoding="utf-8")
    out = tmp_path / "o.csv"
    assert cli.main(["predict", str(text_model), str(src), "--output", str(out)]) == 0
    rows = _rows(out.read_text())
    assert [r["id"] for r in rows] == ["0", "1", "2"] and "empty text" in rows[1]["warning"]


def test_a_semicolon_csv_is_named_as_such(text_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id;text\n1;good film\n2;bad film\n", encoding="utf-8")
    line = _err(capsys, ["predict", str(text_model), str(src), "--output", str(tmp_path / "o.csv")])
    assert str(src) in line and "semicolons" in line and "save the file with commas" in line


def test_absurd_settings_are_said(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from duoclass.settings.config import TrainConfig

    caplog.set_level("WARNING", logger="duoclass")
    TrainConfig(data="x", lr=1e3)
    assert "--lr 1000: far above any usual rate" in caplog.text
    caplog.clear()
    data = make_toy(tmp_path / "toy", 30, 8)
    duoclass.train(data, model="tfidf-mlp", epochs=1, image_size=64, output=str(tmp_path / "run"), **FAST)
    assert "--image-size 64: applies to images; ignored for text" in caplog.text


def test_tune_trials_keep_no_training_state(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from duoclass.settings.config import TrainConfig
    from duoclass.training.tune import tune

    data = make_toy(tmp_path / "toy", 40, 10)
    tune(TrainConfig(data=str(data), model="fasttext", epochs=1, progress=False, tensorboard=False, device="cpu"),
         trials=2, study_dir=tmp_path / "s")
    trials = sorted((tmp_path / "s").glob("trial-*"))
    assert len(trials) == 2 and all((t / "model" / "config.json").is_file() for t in trials)
    assert not any((t / "state.pt").exists() for t in trials)


def test_a_deleted_variants_folder_leaves_the_model_loadable(text_model: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from duoclass.compress.onnx import export_onnx

    folder = tmp_path / "model"
    shutil.copytree(text_model, folder)
    export_onnx(folder)
    onnx_file = next((folder / "variants" / "onnx").glob("*.onnx"))
    onnx_file.unlink()  # a file missing inside a variant that is still there: damage, refused
    with pytest.raises(duoclass.DuoclassError, match="missing from the model folder"):
        duoclass.load(folder, device="cpu")
    shutil.rmtree(folder / "variants")  # the whole variants/ deleted: the model itself is intact
    clf = duoclass.load(folder, device="cpu")
    assert clf.predict(["good film"])[0] in ("pos", "neg")
    assert "the onnx variant was deleted; the folder loads without it" in caplog.text
    with pytest.raises(duoclass.DuoclassError, match="no onnx variant"):
        duoclass.load(folder, backend="onnx")


def test_a_heartbeat_line_when_no_progress_bar_is_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With stderr not a terminal (a log file, CI), training logs progress within an epoch; the heartbeat
    writes at most one line per interval and reads the loss only then."""
    from duoclass.report import heartbeat
    from duoclass.report.heartbeat import Heartbeat

    now = [0.0]
    calls = []
    beat = Heartbeat("epoch 1/1 steps", 100, every=60, clock=lambda: now[0])
    caplog.set_level("INFO", logger="duoclass")
    for step in range(1, 101):
        now[0] = step * 2.0  # two seconds a step
        beat.beat(step, lambda: calls.append(step) or "loss 0.5")
    assert calls == [30, 60, 90]  # every 60 s, the loss read then only
    assert "epoch 1/1 steps: 30/100 (30%), loss 0.5, 60 s" in caplog.text
    monkeypatch.setattr(heartbeat, "EVERY_S", 0.0)  # a real run: a line after every step
    caplog.clear()
    data = make_toy(tmp_path / "toy", 40, 10)
    duoclass.train(data, model="tfidf-mlp", epochs=1, output=str(tmp_path / "run"), **FAST)
    assert any(r.getMessage().startswith("epoch 1/1 steps: 1/") and ", loss " in r.getMessage() for r in caplog.records), caplog.text


def test_every_positional_has_help_and_no_option_shows_two_defaults() -> None:
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"duoclass {name}: positional {action.dest} has no help"
        assert "(default: MODEL_DIR-pruned) (default" not in p.format_help(), name
