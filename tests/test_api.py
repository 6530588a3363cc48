"""End to end on real data (scikit-learn's digits): train -> model folder -> load -> predict / evaluate."""
from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import duoclass

from .conftest import run_cli, shared

FAST = dict(model="msresnet-tiny", image_size=16, epochs=4, batch_size=64, lr=3e-3, augment="none", progress=False)


@pytest.fixture(scope="module")
def trained(digits: Path, tmp_path_factory) -> duoclass.Classifier:
    out = tmp_path_factory.mktemp("run")
    return duoclass.train(digits, output=str(out), **FAST)


def test_train_outputs(trained: duoclass.Classifier) -> None:
    run = trained.result_.run_dir
    for name in ("config.yaml", "state.pt", "metrics.csv", "metrics.jsonl", "metrics.json", "curves.png", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    folder = run / "model"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["classes"] == [str(i) for i in range(10)]
    assert cfg["preprocessing"]["image_size"] == 16
    assert cfg["model"]["name"] == "msresnet-tiny" and "torch" in cfg["versions"]
    summary = json.loads((run / "metrics.json").read_text())
    assert set(summary["test"]) >= {"accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "per_class", "confusion_matrix"}
    assert np.asarray(summary["test"]["confusion_matrix"]).sum() == 359  # digits test split
    # 4 epochs of a tiny CNN at 16 px already separate the digits far above chance (0.1)
    assert summary["test"]["accuracy"] > 0.6
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    # the model folder is the epoch with the best valid balanced accuracy (the default --select-metric);
    # on a tie the later epoch wins
    scores = [float(r["valid_balanced_accuracy"]) for r in rows]
    assert summary["best_epoch"] == max(range(1, 5), key=lambda e: (scores[e - 1], e))


def test_load_predict_matches_evaluate(trained: duoclass.Classifier, digits: Path) -> None:
    clf = duoclass.load(trained.result_.model_dir)
    files = sorted((digits / "test").rglob("*.png"))
    probs = clf.predict_proba(files)
    assert probs.shape == (len(files), 10)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    labels = clf.predict(files)
    acc = np.mean([lab == f.parent.name for lab, f in zip(labels, files)])
    m = clf.evaluate(digits, split="test")
    assert abs(acc - m["accuracy"]) < 1e-9
    assert abs(m["accuracy"] - trained.result_.test["accuracy"]) < 1e-9
    # inputs as PIL images and as bytes give the same answer as paths
    from PIL import Image

    assert clf.predict([Image.open(files[0])]) == [labels[0]]
    assert clf.predict(files[0].read_bytes()) == [labels[0]]


def test_cli_evaluate_json(trained: duoclass.Classifier, digits: Path) -> None:
    r = run_cli("evaluate", str(trained.result_.model_dir), str(digits), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "per_class", "confusion_matrix"):
        assert key in m
    assert abs(m["accuracy"] - trained.result_.test["accuracy"]) < 1e-9


def test_cli_predict_folder_zip_csv(trained: duoclass.Classifier, digits: Path, tmp_path: Path) -> None:
    model = str(trained.result_.model_dir)
    files = sorted((digits / "test" / "3").glob("*.png"))[:5]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"not an image")
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as zf:
        for f in files:
            zf.write(f, f"imgs/{f.name}")
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"in/{f.name}\n" for f in files))
    expected = duoclass.load(model).predict(files)
    for src in ("in", "in.zip", "list.csv", f"in/{files[0].name}"):
        out = tmp_path / f"pred_{src.replace('/', '_')}.csv"
        r = run_cli("predict", model, src, "--output", str(out), "--top-k", "3", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader(out.open()))
        good = [row for row in rows if not row["error"]]
        n = 1 if src.startswith("in/") else 5
        assert [row["label"] for row in good] == expected[:n]
        assert all(len(row["top_k"].split(";")) == 3 for row in good)
        assert all(0 < float(row["probability"]) <= 1 for row in good)
        if src == "in":  # the unreadable file keeps its row, with the reason
            bad = [row for row in rows if row["error"]]
            assert len(bad) == 1 and bad[0]["path"].endswith("broken.png") and "not an image" in bad[0]["error"]


def test_zip_and_manifest_sources(digits: Path, tmp_path: Path) -> None:
    from duoclass.data.sources import read_image_dataset

    zpath = tmp_path / "digits.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(digits.rglob("*.png")):
            zf.write(f, "top/" + str(f.relative_to(digits)))
    z = read_image_dataset(zpath)
    d = read_image_dataset(digits)
    assert {k: len(v) for k, v in z.splits.items()} == {k: len(v) for k, v in d.splits.items()}
    assert z.read_only
    rows = [(str(f.relative_to(digits)), f.parent.name) for f in sorted((digits / "train").rglob("*.png"))]
    (digits.parent / "manifest.csv").write_text("path,label\n" + "".join(f"digits/{p},{y}\n" for p, y in rows))
    m = read_image_dataset(digits.parent / "manifest.csv")
    assert len(m.splits["train"]) == len(rows) and m.splits["train"][0][1] == rows[0][1]


def test_train_from_zip_reads_in_place(digits: Path, tmp_path: Path) -> None:
    zpath = tmp_path / "digits.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(digits.rglob("*.png")):
            zf.write(f, "digits/" + str(f.relative_to(digits)))
    before = sorted(p.name for p in tmp_path.iterdir())
    clf = duoclass.train(zpath, output=str(tmp_path / "run"), **{**FAST, "epochs": 1})
    assert clf.result_.test is not None and clf.result_.test["n"] == 359
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["run"])  # nothing extracted


def test_config_yaml_and_flags(digits: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: msresnet-tiny\nimage_size: 16\nepochs: 1\nbatch_size: 128\naugment: none\nlr: 0.01\n")
    r = run_cli("train", str(digits), "--config", str(cfg), "--epochs", "2", "--output", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 0, r.stderr
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 2" in saved and "batch_size: 128" in saved and "lr: 0.01" in saved  # flag wins over YAML
    assert json.loads(r.stdout.strip().splitlines()[-1])["split"] == "test"


def test_real_xrays_subset(tmp_path: Path) -> None:
    """Real chest X-rays read through a CSV manifest; one quick epoch on a subset."""
    root = shared("images/pneumoniamnist")
    rows = []
    for split in ("train", "valid", "test"):
        for cls in ("normal", "pneumonia"):
            for f in sorted((root / split / cls).glob("*.png"))[:60]:
                rows.append(f"{f},{cls},{split}\n")
    (tmp_path / "m.csv").write_text("path,label,split\n" + "".join(rows))
    clf = duoclass.train(tmp_path / "m.csv", output=str(tmp_path / "run"), **{**FAST, "image_size": None, "epochs": 1})
    assert clf.config_["preprocessing"]["image_size"] == 28  # small images train at native size
    assert clf.result_.test["n"] == 120


def test_balanced_accuracy_and_selection_rule() -> None:
    from duoclass.report.metrics import classification_metrics, select

    # 3 of class a (2 right), 1 of class b (right), class c absent from the labels
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    m = classification_metrics(np.array([0, 0, 0, 1]), probs, ["a", "b", "c"])
    assert m["accuracy"] == 0.75
    assert abs(m["balanced_accuracy"] - (2 / 3 + 1) / 2) < 1e-12  # absent classes do not count
    assert abs(m["recall_macro"] - (2 / 3 + 1 + 0) / 3) < 1e-12
    assert select("balanced_accuracy", 0.9, None, 0) == (True, 0.9, 0)
    assert select("balanced_accuracy", 0.95, 0.9, 3) == (True, 0.95, 0)
    # a tie saves the later epoch but does not reset the early-stopping count
    assert select("balanced_accuracy", 0.9, 0.9, 2) == (True, 0.9, 3)
    assert select("balanced_accuracy", 0.8, 0.9, 2) == (False, 0.9, 3)
    assert select("loss", 0.3, 0.4, 1) == (True, 0.3, 0)
    assert select("loss", 0.5, 0.4, 1) == (False, 0.4, 2)
