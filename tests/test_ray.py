"""Batch prediction on a real local Ray instance: `--engine ray` writes the same CSV as local predict, byte for
byte (ids, order, per-item errors and warnings kept), for an image model, a bag-of-n-grams text model and a
padded sequence model; `predict_dataset` on a user's Ray Dataset; the errors.
The models are the session's tiny ones (msresnet-tiny on digits, tfidf-mlp on the toy texts) plus a one-epoch
albert-scratch-tiny, whose batches are padded, so a batch formed differently would show in its probabilities.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pd = pytest.importorskip("pandas")

import duoclass  # noqa: E402
from duoclass.errors import DuoclassError  # noqa: E402
from duoclass.infer.csv import predict_to_csv  # noqa: E402
from duoclass.infer.ray import predict_dataset, predict_to_csv_ray  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .test_robust_eval import FAST, digits_model, text_model, toy_text  # noqa: E402,F401  (shared fixtures)

pytestmark = pytest.mark.timeout(600)

TEXTS = ["a really lovely movie", "", "the plot was awful", "superb acting, superb music and a superb cast",
         "horrible dreadful film quite bad", "zzzz qqqq", "good", "a lovely lovely lovely film with a bad ending"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray instance for the module (predict_to_csv_ray and predict_dataset use a running one)."""
    monkey = pytest.MonkeyPatch()
    monkey.setenv("RAY_worker_niceness", "0")  # as duoclass's own local instance does (ray_predict.ray_session)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    monkey.undo()


@pytest.fixture(scope="module")
def albert_clf(toy_text: Path, tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    out = tmp_path_factory.mktemp("ray-albert")
    return duoclass.train(toy_text, model="albert-scratch-tiny", epochs=1, output=str(out), **FAST)


@pytest.fixture(scope="module")
def texts_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("ray-texts") / "testa.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(5):  # 40 rows of mixed lengths, so batch_size=8 makes several padded batches
            for j, t in enumerate(TEXTS):
                w.writerow([f"q{i}-{j}", (t + " ") * (i % 3) + t])
    return p


@pytest.fixture(scope="module")
def images(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 digit images in two folders plus a truncated PNG and a text file named .png: two error rows."""
    root = tmp_path_factory.mktemp("ray-images") / "inbox"
    for d in ("3", "7", "9"):
        (root / d).mkdir(parents=True)
        for f in sorted((digits / "test" / d).iterdir())[:10]:
            shutil.copy(f, root / d / f.name)
    good = sorted((root / "3").iterdir())[0].read_bytes()
    (root / "7" / "broken.png").write_bytes(good[: len(good) // 2])
    (root / "9" / "notes.png").write_text("not an image")
    return root


def both(clf: duoclass.Classifier, inputs: Path, tmp: Path, **kw: Any) -> tuple[str, str]:
    local, on_ray = tmp / "local.csv", tmp / "ray.csv"
    predict_to_csv(clf, inputs, local, **kw)
    predict_to_csv_ray(clf.folder, inputs, on_ray, workers=2, **kw)
    return local.read_text(encoding="utf-8"), on_ray.read_text(encoding="utf-8")


@pytest.mark.parametrize("model", ["text_model", "albert_clf"])
def test_ray_text_csv_equals_local(local_ray: Any, model: str, request: pytest.FixtureRequest, texts_csv: Path,
                                   tmp_path: Path) -> None:
    clf = request.getfixturevalue(model)
    local, on_ray = both(clf, texts_csv, tmp_path, top_k=2, batch_size=8)
    assert on_ray == local
    rows = list(csv.DictReader(local.splitlines()))
    assert [r["id"] for r in rows] == [f"q{i}-{j}" for i in range(5) for j in range(len(TEXTS))]
    assert any(r["warning"] for r in rows)  # the empty texts are flagged, in both files
    assert all(r["label"] in clf.classes_ for r in rows)


def test_ray_image_csv_equals_local_with_relative_paths(local_ray: Any, digits_model: duoclass.Classifier, images: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(images.parent)  # relative refs: the workers must read them from the caller's folder
    local, on_ray = both(digits_model, Path("inbox"), tmp_path, top_k=3, batch_size=7)
    assert on_ray == local
    rows = list(csv.DictReader(local.splitlines()))
    assert len(rows) == 32 and rows[0]["path"].startswith("inbox")
    failed = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(failed) == {"broken.png", "notes.png"} and all(failed.values())
    assert sum(bool(r["label"]) for r in rows) == 30


def test_labels_only_csv_equals_local(local_ray: Any, text_model: duoclass.Classifier, texts_csv: Path,
                                      tmp_path: Path) -> None:
    local, on_ray = both(text_model, texts_csv, tmp_path, labels_only=True)
    assert on_ray == local and local.splitlines()[0] == "id,label"


def test_predict_dataset_on_a_users_dataset(local_ray: Any, text_model: duoclass.Classifier,
                                            digits_model: duoclass.Classifier, images: Path) -> None:
    ds = ray.data.from_items([{"id": i, "text": t, "lang": "en"} for i, t in enumerate(TEXTS * 3)])
    df = predict_dataset(ds, text_model.folder, workers=2, batch_size=5, top_k=2).to_pandas().sort_values("id")
    expect = text_model.predict_results(TEXTS * 3, top_k=2)
    assert list(df["label"]) == [r.label for r in expect]
    assert list(df["score"]) == pytest.approx([r.score for r in expect], abs=1e-6)
    assert list(df["lang"]) == ["en"] * len(expect)  # the user's columns are kept
    assert (df["error"] == "").all()
    # a missing text (None, as a CSV's empty field reads) is the empty text: a guess with a warning, not "None"
    df = predict_dataset(ray.data.from_items([{"text": None}, {"text": "good"}]), text_model.folder,
                         workers=1).to_pandas()
    assert df["warning"][0] == text_model.predict_results([""])[0].warning and df["warning"][1] == ""
    # images as bytes, the way ray.data.read_binary_files gives them
    files = sorted(p for p in images.rglob("*.png"))
    ds = ray.data.from_items([{"path": str(p), "bytes": p.read_bytes()} for p in files])
    df = predict_dataset(ds, digits_model.folder, column="bytes", workers=2, batch_size=8).to_pandas()
    by_path = dict(zip(df["path"], zip(df["label"], df["error"])))
    expect = digits_model.predict_results([str(p) for p in files])
    for p, r in zip(files, expect):
        label, error = by_path[str(p)]
        if r.ok:
            assert (label, error) == (r.label, "")
        else:
            assert label == "" and error  # its own error, not its batch's


def test_ray_errors(local_ray: Any, text_model: duoclass.Classifier, texts_csv: Path, tmp_path: Path) -> None:
    ds = ray.data.from_items([{"sentence": "good"}])
    with pytest.raises(DuoclassError, match="no 'text' column.*sentence.*column=NAME"):
        predict_dataset(ds, text_model.folder)
    with pytest.raises(DuoclassError, match="already has column.*label"):
        predict_dataset(ray.data.from_items([{"text": "good", "label": "x"}]), text_model.folder)
    with pytest.raises(DuoclassError, match="--backend onnx: the folder has no onnx variant.*duoclass export"):
        predict_dataset(ray.data.from_items([{"text": "good"}]), text_model.folder, backend="onnx")
    with pytest.raises(DuoclassError, match="--workers 0: need at least 1"):
        predict_to_csv_ray(text_model.folder, texts_csv, tmp_path / "x.csv", workers=0)
    with pytest.raises(DuoclassError, match="config.json"):
        predict_to_csv_ray(tmp_path, texts_csv, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_cli_engine_ray_starts_its_own_ray(text_model: duoclass.Classifier, texts_csv: Path, tmp_path: Path) -> None:
    """The command line, in a fresh process that starts (and stops) a local Ray instance of its own."""
    r = run_cli("predict", str(text_model.folder), str(texts_csv), "--engine", "ray", "--workers", "2",
                "--top-k", "2", "--output", str(tmp_path / "ray.csv"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 40 predictions" in r.stdout
    predict_to_csv(text_model, texts_csv, tmp_path / "local.csv", top_k=2)
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    r = run_cli("predict", str(text_model.folder), str(texts_csv), "--workers", "2")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --workers and --ray-address")
    r = run_cli("predict", str(text_model.folder), str(texts_csv), "--engine", "ray", "--backend", "tflite")
    assert r.returncode == 2 and "error: --backend tflite: unknown backend" in r.stderr.strip().splitlines()[-1]


def test_ray_on_the_onnx_backend(local_ray: Any, text_model: duoclass.Classifier, texts_csv: Path,
                                 tmp_path: Path) -> None:
    """The workers run the folder's ONNX variant (no torch in the model's path) and write local predict's CSV."""
    from duoclass.compress.onnx import export_onnx

    folder = tmp_path / "model"
    shutil.copytree(text_model.folder, folder)
    export_onnx(folder)
    local = duoclass.Classifier.from_folder(folder, backend="onnx")
    predict_to_csv(local, texts_csv, tmp_path / "local.csv", top_k=2)
    predict_to_csv_ray(folder, texts_csv, tmp_path / "ray.csv", workers=2, top_k=2, backend="onnx")
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()


def test_conformal_sets_and_abstentions_on_ray_equal_local(local_ray: Any, text_model: duoclass.Classifier,
                                                           texts_csv: Path, tmp_path: Path) -> None:
    """The set and abstained columns come from the workers, and the file is still the local one, byte for byte."""
    from duoclass.compress.recalibrate import calibrate_model_folder

    calibrate_model_folder(text_model.folder, conformal=0.2, output=tmp_path / "cp")  # the toy's valid split
    clf = duoclass.load(tmp_path / "cp")
    texts = [r["text"] for r in csv.DictReader(texts_csv.open(encoding="utf-8"))]
    p = round(float(np.median(clf.predict_proba(texts).max(axis=1))), 3)  # about half abstain
    local, on_ray = both(clf, texts_csv, tmp_path, top_k=2, batch_size=8, abstain_below=p)
    assert on_ray == local
    rows = list(csv.DictReader(local.splitlines()))
    assert list(rows[0]) == ["id", "label", "probability", "top_k", "set", "abstained", "error", "warning"]
    assert {r["abstained"] for r in rows} == {"true", "false"}
    assert all((r["label"] == "abstained") == (r["abstained"] == "true") for r in rows)
