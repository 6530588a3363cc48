"""The public Python API and command contract where duoclass looks like scikit-learn or transformers:
the pipeline-style call, top_k, classes_, NotFittedError, the stage entry points, --ray-workers,
--pooling on image models, and ONNX Runtime threads."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import duoclass
from duoclass.cli import commands as cli
from duoclass.errors import DuoclassError, NotFittedError

from .conftest import run_cli
from .test_text import make_toy

pytestmark = pytest.mark.timeout(300)

QUIET = dict(progress=False, tensorboard=False, device="cpu", workers=0, seed=0, explain_examples=0)
IMAGE = dict(model="msresnet-tiny", image_size=16, epochs=2, batch_size=64, lr=3e-3, augment="none", **QUIET)


@pytest.fixture(scope="module")
def image_clf(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    """10 classes; the run records top-3 accuracy (config.json evaluation.top_k = 3), not the default 5."""
    return duoclass.train(digits, output=str(tmp_path_factory.mktemp("img") / "run"), top_k=3, **IMAGE)


@pytest.fixture(scope="module")
def text_clf(tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    toy = make_toy(tmp_path_factory.mktemp("toy") / "toy", 80, 20)
    return duoclass.train(toy, model="tfidf-mlp", epochs=3, batch_size=16, output=str(toy.parent / "run"), **QUIET)


@pytest.fixture(scope="module")
def pngs(digits: Path) -> list[Path]:
    return sorted((digits / "test").rglob("*.png"))[:4]


# --- 1. __call__ like transformers' text-classification pipeline; top_k=None means every label -----------
def test_call_is_shaped_like_the_pipeline(image_clf: duoclass.Classifier, pngs: list[Path]) -> None:
    clf = image_clf
    labels = clf.predict(pngs)
    one = clf(pngs[0])  # top_k=1, one input: one dict
    assert isinstance(one, dict) and set(one) == {"label", "score"} and one["label"] == labels[0]
    many = clf(pngs[:2])  # top_k=1, a list: a list of dicts
    assert isinstance(many, list) and all(isinstance(d, dict) for d in many)
    assert [d["label"] for d in many] == labels[:2] and all(0 < d["score"] <= 1 for d in many)
    top2 = clf(pngs[:2], top_k=2)  # k > 1: k dicts per input, best first
    assert len(top2) == 2 and all(len(x) == 2 and x[0]["score"] >= x[1]["score"] for x in top2)
    assert [x[0] for x in top2] == many
    alone = clf(pngs[0], top_k=3)
    assert isinstance(alone, list) and len(alone) == 3 and alone[0] == one
    every = clf(pngs[0], top_k=None)  # the pipeline's top_k=None: every label, sorted by score
    assert sorted(d["label"] for d in every) == sorted(clf.classes_.tolist())
    scores = [d["score"] for d in every]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)
    json.dumps([one, many, top2, every])  # plain str and float: JSON-safe


def test_call_gives_an_error_dict_for_an_unusable_input(image_clf: duoclass.Classifier, pngs: list[Path]) -> None:
    out = image_clf([pngs[0], b"not an image", pngs[1]])
    assert "error" in out[1] and set(out[1]) == {"error"}
    assert set(out[0]) == set(out[2]) == {"label", "score"}
    out = image_clf([pngs[0], b"not an image"], top_k=2)
    assert len(out[0]) == 2 and out[1] == [{"error": out[1][0]["error"]}]
    assert "error" in image_clf(b"not an image")


def test_top_k_none_is_every_label_and_zero_is_an_error(image_clf: duoclass.Classifier, pngs: list[Path],
                                                        tmp_path: Path) -> None:
    from duoclass.infer.csv import predict_to_csv

    n = len(image_clf.classes_)
    results = image_clf.predict_results(pngs[:2], top_k=None)
    assert all(len(r.top_k) == n for r in results)
    assert all(len(r.top_k) == n for r in image_clf.predict_results(pngs[:1], top_k=50))  # capped at the classes
    for bad in (0, -1):
        with pytest.raises(DuoclassError, match=f"top_k={bad}: .*>= 1"):
            image_clf(pngs[:1], top_k=bad)
        with pytest.raises(DuoclassError, match=f"top_k={bad}"):
            image_clf.predict_results(pngs[:1], top_k=bad)
    predict_to_csv(image_clf, pngs[0], tmp_path / "all.csv", top_k=None)
    row = next(csv.DictReader((tmp_path / "all.csv").open()))
    assert len(row["top_k"].split(";")) == n
    r = run_cli("predict", str(image_clf.folder), str(pngs[0]), "--top-k", "0")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --top-k 0:"), r.stderr


def test_text_model_call(text_clf: duoclass.Classifier) -> None:
    out = text_clf(["a good film", "an awful plot"])
    assert [d["label"] for d in out] == text_clf.predict(["a good film", "an awful plot"])
    assert isinstance(text_clf("a lovely story"), dict)
    assert [len(x) for x in text_clf(["good", "bad"], top_k=None)] == [2, 2]


# --- 2. evaluate's k of the top-k accuracy: its own name; the recorded setting wins unless overridden aloud --------
def test_evaluate_uses_the_recorded_top_k(image_clf: duoclass.Classifier, digits: Path) -> None:
    m = image_clf.evaluate(digits)
    assert m["topk_accuracy_k"] == 3 and "overrides" not in m
    assert m["top3_accuracy"] == pytest.approx(image_clf.result_.test["top3_accuracy"])  # the run's figure


def test_evaluate_override_is_said(image_clf: duoclass.Classifier, digits: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="duoclass"):
        m = image_clf.evaluate(digits, topk_accuracy_k=5)
    assert "top5_accuracy" in m and "top3_accuracy" not in m
    assert m["topk_accuracy_k"] == 5 and m["overrides"] == {"top_k": {"recorded": 3, "used": 5}}
    assert any("top-5 accuracy, not the top-3" in r.getMessage() for r in caplog.records)
    with pytest.warns(DeprecationWarning, match="topk_accuracy_k"):
        old = image_clf.evaluate(digits, top_k=5)  # the old name still works
    assert old["top5_accuracy"] == m["top5_accuracy"] and old["overrides"] == m["overrides"]
    with pytest.raises(DuoclassError, match="topk_accuracy_k=0"):
        image_clf.evaluate(digits, topk_accuracy_k=0)


def test_cli_evaluate_top_k(image_clf: duoclass.Classifier, digits: Path) -> None:
    model = str(image_clf.folder)
    r = run_cli("evaluate", model, str(digits), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert "top3_accuracy" in m and "top5_accuracy" not in m and "overrides" not in m  # the run's k, not 5
    r = run_cli("evaluate", model, str(digits), "--json", "--top-k", "5")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["overrides"] == {"top_k": {"recorded": 3, "used": 5}} and "top5_accuracy" in m
    assert "top-5 accuracy, not the top-3 the training run recorded" in r.stderr
    r = run_cli("evaluate", model, str(digits), "--top-k", "0")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --top-k 0:")


# --- 3. classes_ is a numpy array of str, as in scikit-learn -----------------------------------------------------
def test_classes_is_a_numpy_array_of_str(image_clf: duoclass.Classifier, pngs: list[Path]) -> None:
    classes = image_clf.classes_
    assert isinstance(classes, np.ndarray) and classes.dtype.kind == "U" and classes.ndim == 1
    assert classes.tolist() == [str(i) for i in range(10)] == image_clf.config_["classes"]
    assert len(classes) == 10 and "3" in classes and classes[3] == "3"
    labels = image_clf.predict(pngs)
    assert all(type(label) is str and label in classes for label in labels)  # plain str, not np.str_
    probs = image_clf.predict_proba(pngs)
    assert [classes[i] for i in probs.argmax(axis=1)] == labels  # columns in classes_ order
    assert all(type(c) is str for r in image_clf.predict_results(pngs, top_k=3) for c, _ in r.top_k)
    assert "'0', '1'" in repr(image_clf) and "np.str_" not in repr(image_clf)
    loaded = duoclass.load(image_clf.folder, device="cpu")
    assert isinstance(loaded.classes_, np.ndarray) and loaded.classes_.tolist() == classes.tolist()


def test_classes_array_in_evaluate_and_the_csv(image_clf: duoclass.Classifier, digits: Path, pngs: list[Path],
                                               tmp_path: Path) -> None:
    from duoclass.infer.csv import predict_to_csv

    m = image_clf.evaluate(digits)
    json.dumps(m)  # classes, per_class keys: JSON-safe
    assert m["classes"] == image_clf.classes_.tolist() and set(m["per_class"]) == set(image_clf.classes_.tolist())
    predict_to_csv(image_clf, pngs[0], tmp_path / "p.csv", top_k=2)
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    assert row["label"] in image_clf.classes_ and "np.str_" not in row["top_k"]


# --- 4. NotFittedError is caught by code written for scikit-learn ---------------------------------------------------
def test_not_fitted_error_is_a_value_error_and_an_attribute_error(text_clf: duoclass.Classifier) -> None:
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    assert issubclass(NotFittedError, DuoclassError) and duoclass.NotFittedError is NotFittedError
    empty = duoclass.Classifier(None, ["neg", "pos"], text_clf.preprocessor, text_clf.config_)
    for exc in (ValueError, AttributeError, NotFittedError):
        with pytest.raises(exc, match="no weights"):
            empty.predict(["good"])
    with pytest.raises(ValueError):
        empty.predict_proba(["good"])
    assert isinstance(empty.classes_, np.ndarray)


# --- 5. every command's stage has a Python entry point in `duoclass` ---------------------------------------------
STAGES = ("export", "quantize", "prune", "tune", "pretrain")


def test_stage_entry_points_are_lazy_and_torch_free() -> None:
    code = ("import sys, duoclass\nassert 'torch' not in sys.modules\n"
            f"names = {STAGES!r}\n"
            "assert all(n in duoclass.__all__ and n in dir(duoclass) for n in names)\n"
            "assert 'torch' not in sys.modules, 'import duoclass'\n"
            "assert all(callable(getattr(duoclass, n)) for n in names)\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_export_load_with_threads_quantize_prune(image_clf: duoclass.Classifier, pngs: list[Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    shutil.copytree(image_clf.folder, folder)
    record = duoclass.export(folder, examples=32)
    assert (folder / record["path"]).is_file() and record["parity"]["label_agreement"] == 1.0
    onnx = duoclass.load(folder, backend="onnx", threads=1)  # 8. threads without the environment variable
    assert onnx.backend.threads == 1 and onnx.predict(pngs) == image_clf.predict(pngs)
    monkeypatch.setenv("DUOCLASS_ONNX_THREADS", "2")
    assert duoclass.load(folder, backend="onnx").backend.threads == 2  # the variable is still the default
    assert duoclass.load(folder, backend="onnx", threads=1).backend.threads == 1  # threads= wins over it
    monkeypatch.delenv("DUOCLASS_ONNX_THREADS")
    with pytest.raises(DuoclassError, match="threads=0"):
        duoclass.load(folder, backend="onnx", threads=0)
    report = duoclass.quantize(folder, force=True, batch_size=16, threads=1)
    assert report["threads"] == 1 and (folder / "variants" / "onnx-int8" / "model.onnx").is_file()
    assert duoclass.load(folder, backend="onnx-int8", threads=1).predict(pngs[:1])[0] in image_clf.classes_
    pruned = duoclass.prune(image_clf.folder, amount=0.5, output=tmp_path / "pruned", device="cpu")
    assert pruned["after"]["params"] < pruned["before"]["params"]
    assert duoclass.load(tmp_path / "pruned", device="cpu").predict(pngs[:1])[0] in image_clf.classes_
    with pytest.raises(DuoclassError, match="output=DIR"):
        duoclass.export(folder, format="transformers")


def test_cli_threads(image_clf: duoclass.Classifier, pngs: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(image_clf.folder, folder)
    duoclass.export(folder, examples=16)
    r = run_cli("predict", str(folder), str(pngs[0]), "--backend", "onnx", "--threads", "1", "--output", str(tmp_path / "a.csv"))
    assert r.returncode == 0, r.stderr
    assert next(csv.DictReader((tmp_path / "a.csv").open()))["label"] == image_clf.predict(pngs[:1])[0]
    r = run_cli("predict", str(folder), str(pngs[0]), "--backend", "onnx", "--threads", "0")
    assert r.returncode == 2 and "error: --threads 0" in r.stderr


def test_tune_and_pretrain(digits: Path, tmp_path: Path) -> None:
    summary = duoclass.tune(digits, trials=1, study_dir=tmp_path / "study", **{**IMAGE, "epochs": 1})
    assert summary["trials"]["total"] == 1 and (tmp_path / "study" / "best.yaml").is_file()
    import yaml

    best = yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())
    assert best["model"] == "msresnet-tiny" and best["image_size"] == 16  # the settings passed are kept fixed
    with pytest.raises(TypeError):
        duoclass.tune(digits, trials=1, config=duoclass.TrainConfig(data=str(digits)))
    toy = make_toy(tmp_path / "toy", 40, 10)
    out = duoclass.pretrain(toy / "train.csv", output=str(tmp_path / "mlm"), epochs=1, batch_size=16, device="cpu",
                            progress=False, tensorboard=False)
    assert out["steps"] > 0 and (tmp_path / "mlm" / "model" / "config.json").is_file()
    with pytest.raises(DuoclassError, match="no corpus"):
        duoclass.pretrain()


# --- 6. predict's Ray workers are --ray-workers; --workers still works there, with a warning ------------------------
def test_predict_ray_workers_flag(text_clf: duoclass.Classifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    import duoclass.infer.ray as ray_predict

    calls = []
    monkeypatch.setattr(ray_predict, "predict_to_csv_ray", lambda *a, **kw: calls.append(kw) or (1, 0))
    texts = tmp_path / "t.csv"
    texts.write_text("id,text\n1,good\n")
    base = ["predict", str(text_clf.folder), str(texts), "--engine", "ray"]
    assert cli.main([*base, "--ray-workers", "3"]) == 0
    assert calls[-1]["workers"] == 3 and "deprecated" not in capsys.readouterr().err
    assert cli.main([*base, "--workers", "4"]) == 0
    assert calls[-1]["workers"] == 4
    assert "--workers is deprecated; use --ray-workers" in capsys.readouterr().err
    assert cli.main([*base]) == 0 and calls[-1]["workers"] == 2  # the default
    assert cli.main([*base, "--ray-workers", "0"]) == 2
    assert "error: --ray-workers 0: need at least 1 worker" in capsys.readouterr().err
    assert cli.main(["predict", str(text_clf.folder), str(texts), "--ray-workers", "2"]) == 2
    assert "error: --ray-workers and --ray-address are for --engine ray" in capsys.readouterr().err
    assert len(calls) == 3


# --- 7. --pooling with an image model is an error, not silently dropped -------------------------------------------
def test_pooling_with_an_image_model_is_an_error(digits: Path, tmp_path: Path) -> None:
    with pytest.raises(DuoclassError, match=r"^--pooling attention: only text models .*msresnet-tiny.*drop --pooling$"):
        duoclass.train(digits, pooling="attention", output=str(tmp_path / "run"), **IMAGE)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    r = run_cli("train", str(digits), "--model", "msresnet-tiny", "--pooling", "attention", "--output", str(tmp_path / "r2"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --pooling attention: only text")
    from duoclass.training.run import resolve

    assert resolve(duoclass.TrainConfig(data=str(digits), model="msresnet-tiny")).pooling == "cls"  # the default is fine


def test_config_and_settings_together_are_refused() -> None:
    """Holds: train, tune and pretrain take either config= or the data and settings, never both silently."""
    with pytest.raises(TypeError, match="pass either config= or data and settings"):
        duoclass.train("x", config=duoclass.TrainConfig(data="y"))
    with pytest.raises(TypeError, match="pass either config= or data and settings"):
        duoclass.tune(config=duoclass.TrainConfig(data="y"), trials=1, epochs=2)
    with pytest.raises(TypeError, match="pass either config= or corpus and settings"):
        duoclass.pretrain("c.txt", config=duoclass.PretrainConfig(corpus="d.txt"))
