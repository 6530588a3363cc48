"""The engine's seams (a given model, a training step, a batch source), the one predict path with
per-item errors, and prediction without torch in the preprocessing."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import duoclass
from duoclass.training.run import prepare, resolve_settings
from duoclass.settings.config import TrainConfig

from .conftest import run_cli

TINY = dict(model="msresnet-tiny", image_size=16, batch_size=64, lr=3e-3, augment="none", progress=False,
            tensorboard=False, workers=0, device="cpu", deterministic=True, explain_examples=0)


def _settings(data: Path, out: Path, **kw) -> TrainConfig:
    return resolve_settings(TrainConfig(data=str(data), output=str(out), **{**TINY, **kw}))


def test_custom_step_is_used_and_changes_the_gradients(digits: Path, tmp_path: Path) -> None:
    """fit(step=...) runs the given step; a step that doubles the loss doubles every gradient."""
    from duoclass.training.loop import fit
    from duoclass.training.steps import standard_step

    cfg = _settings(digits, tmp_path / "a", epochs=1, max_steps=1)
    data = prepare(cfg)
    norms: dict[str, list[float]] = {"standard": [], "doubled": []}

    def recording(name, scale):
        def step(ctx, inputs, labels):
            loss = ctx.loss_fn(ctx.forward(inputs).float(), labels) * scale
            ctx.backward(loss)
            norms[name].append(float(torch.cat([p.grad.flatten() for p in ctx.model.parameters() if p.grad is not None]).norm()))
            return loss.detach()
        return step

    fit(cfg, data, step=recording("standard", 1.0))
    fit(dataclasses.replace(cfg, output=str(tmp_path / "b")), data, step=recording("doubled", 2.0))
    assert len(norms["standard"]) == 1 and len(norms["doubled"]) == 1  # max_steps=1: exactly one step each
    assert norms["doubled"][0] == pytest.approx(2 * norms["standard"][0], rel=1e-4)
    assert standard_step.__name__ == "standard_step"


def test_batch_source_other_than_the_dataloader_trains(digits: Path, tmp_path: Path) -> None:
    """A batch source that keeps the whole training set as one tensor (as a GPU-resident one would) trains a model."""
    from duoclass.training.loop import fit

    cfg = _settings(digits, tmp_path / "run", epochs=4)
    data = prepare(cfg)
    x = torch.stack([data.train.transform(t) for t in data.train.cache])  # (N, 3, 16, 16) float in [0, 1]
    y = torch.tensor(data.train.labels)

    class TensorSource:
        def __init__(self):
            self.used = 0

        def __len__(self):
            return len(y) // 64

        def epoch(self, epoch):
            self.used += 1
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
            for i in range(len(self)):
                idx = perm[i * 64 : (i + 1) * 64]
                yield {"pixel_values": x[idx]}, y[idx]

    data.batches = TensorSource()
    result = fit(cfg, data)
    assert data.batches.used == 4
    assert result.test["accuracy"] > 0.5  # chance is 0.1


def test_given_model_is_trained(digits: Path, tmp_path: Path) -> None:
    """fit(model=...) trains the module it is given (e.g. a pruned one) instead of building one."""
    from duoclass.training.loop import fit
    from duoclass.models import create_model

    cfg = _settings(digits, tmp_path / "run", epochs=1, max_steps=2)
    data = prepare(cfg)
    model = create_model("msresnet-tiny", 10, **data.model_args)
    before = model.backbone.fc.weight.detach().clone()
    fit(cfg, data, model=model)
    assert not torch.equal(before, model.backbone.fc.weight.detach())


@pytest.fixture(scope="module")
def digits_model(digits: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    r = run_cli("train", str(digits), "--model", "msresnet-tiny", "--image-size", "16", "--epochs", "2", "--tta",
                "--augment", "none", "--device", "cpu", "--workers", "0", "--no-tensorboard", "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr  # no progress-bar updates written when stderr is not a terminal
    return out


def test_one_bad_image_among_good_ones(digits_model: Path, digits: Path, tmp_path: Path) -> None:
    clf = duoclass.load(digits_model / "model")
    good = sorted((digits / "test").rglob("*.png"))[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:40])  # a truncated PNG
    inputs = [good[0], bad, good[1], good[2]]
    results = clf.predict_results(inputs, top_k=2)
    assert [r.ok for r in results] == [True, False, True, True]
    assert "broken.png" in results[1].error
    labels = clf.predict(inputs)
    assert labels[1] is None and all(isinstance(labels[i], str) for i in (0, 2, 3))
    probs = clf.predict_proba(inputs)
    assert np.isnan(probs[1]).all() and np.allclose(probs[[0, 2, 3]].sum(axis=1), 1, atol=1e-5)
    # the good ones get exactly what they get alone
    assert np.allclose(probs[[0, 2, 3]], clf.predict_proba([good[0], good[1], good[2]]), atol=1e-6)
    out = clf(inputs, top_k=2)
    assert len(out[0]) == 2 and set(out[0][0]) == {"label", "score"} and "error" in out[1][0]
    assert clf(good[0])["label"] == labels[0]  # one input: its {label, score}
    assert "msresnet-tiny" in repr(clf) and "classes=" in repr(clf)


def test_evaluate_uses_the_evaluation_settings_of_the_run(digits_model: Path, digits: Path) -> None:
    """A run trained with --tta reports test metrics with TTA; `duoclass evaluate` on its folder gives the same."""
    summary = json.loads((digits_model / "metrics.json").read_text())
    cfg = json.loads((digits_model / "model" / "config.json").read_text())
    assert cfg["evaluation"]["tta"] is True
    r = run_cli("evaluate", str(digits_model / "model"), str(digits), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert m["tta"] is True


def test_evaluate_refuses_data_of_the_other_modality(digits_model: Path, tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "test.csv").write_text("text,label\nhello,0\nbye,1\n")
    r = run_cli("evaluate", str(digits_model / "model"), str(tmp_path / "texts"))
    assert r.returncode == 2
    assert "holds text data" in r.stderr and "image model" in r.stderr and "Traceback" not in r.stderr


def test_predict_exits_nonzero_when_nothing_is_readable(digits_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not an image")
    (folder / "b.png").write_bytes(b"")
    out = tmp_path / "pred.csv"
    r = run_cli("predict", str(digits_model / "model"), str(folder), "--output", str(out))
    assert r.returncode == 2 and "none of the 2 inputs" in r.stderr
    rows = out.read_text().splitlines()
    assert rows[0] == "path,label,probability,error,warning" and len(rows) == 3  # the rows are kept, with the errors


def test_python_train_logs_every_epoch(digits: Path, tmp_path: Path) -> None:
    code = ("import duoclass; duoclass.train(%r, model='msresnet-tiny', image_size=16, epochs=2, augment='none', "
            "device='cpu', workers=0, tensorboard=False, output=%r)" % (str(digits), str(tmp_path / "run")))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch 1/2" in r.stderr and "epoch 2/2" in r.stderr and "test accuracy" in r.stderr


def test_import_and_help_do_not_import_torch() -> None:
    code = ("import sys, contextlib, io\nimport duoclass\nassert 'torch' not in sys.modules, 'import duoclass'\n"
            "from duoclass.cli import commands as cli\n"
            "for argv in (['--help'], ['train', '--help'], ['predict', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            cli.main(argv)\n        except SystemExit:\n            pass\n"
            "    assert 'torch' not in sys.modules, argv\n"
            "import duoclass.preprocess.load, duoclass.preprocess.text, duoclass.infer.predict, duoclass.infer.classifier\n"
            "assert 'torch' not in sys.modules, 'preprocessing'\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_loading_a_folder_imports_torch(digits_model: Path) -> None:
    code = ("import sys, duoclass\nclf = duoclass.load(%r)\nprint('torch' in sys.modules, clf.backend.name)"
            % str(digits_model / "model"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "torch"]


def test_preprocessing_makes_numpy_arrays(digits: Path) -> None:
    from duoclass.preprocess.image import ImagePreprocessor

    pre = ImagePreprocessor(16)
    x = pre.load(next((digits / "test").rglob("*.png")))
    assert isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape == (3, 16, 16)
    batch = pre.collate([x, x])
    assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].shape == (2, 3, 16, 16)
    assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0


def test_no_host_device_sync_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_one_epoch reads the loss back once per epoch, not once per step (.item() forces a sync on a GPU)."""
    from torch import nn

    from duoclass.training.steps import StepContext
    from duoclass.training.loop import train_one_epoch

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    wrapped = type("M", (nn.Module,), {"forward": lambda self, b: model(b["pixel_values"])})()
    wrapped.add_module("net", model)
    batches = [({"pixel_values": torch.randn(8, 3, 2, 2)}, torch.randint(0, 3, (8,))) for _ in range(30)]
    calls = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or real_item(self))
    ctx = StepContext(wrapped, nn.CrossEntropyLoss(), torch.device("cpu"))
    loss = train_one_epoch(ctx, batches, torch.optim.SGD(wrapped.parameters(), lr=0.1))
    assert ctx.step == 30 and loss > 0
    assert len(calls) == 1  # the epoch's mean, at the end


def test_text_folder_with_validation_csv_and_renamed_columns(tmp_path: Path) -> None:
    """A text folder may name its valid file validation.csv (as image folders may name theirs validation/),
    and `evaluate` takes the column names when they differ from the training data's."""
    import csv as csv_

    from .test_text import toy_rows

    root = tmp_path / "data"
    root.mkdir()
    for split, n in (("train", 60), ("validation", 20), ("test", 20)):
        with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv_.writer(f)
            w.writerow(["id", "text", "label"])
            w.writerows(toy_rows(n, split[0], 7))
    cfg = resolve_settings(TrainConfig(data=str(root), model="tfidf-mlp"))
    data = prepare(cfg)
    assert len(data.valid) == 20 and not any("no valid split" in n for n in data.notes)
    clf = duoclass.train(root, model="tfidf-mlp", epochs=3, progress=False, tensorboard=False, workers=0,
                         output=str(tmp_path / "run"))
    other = tmp_path / "other"
    other.mkdir()
    with (other / "test.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv_.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows((t, y) for _, t, y in toy_rows(20, "t", 7))
    r = run_cli("evaluate", str(tmp_path / "run" / "model"), str(other), "--text-column", "review",
                "--label-column", "sentiment", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 20
    assert clf.evaluate(other, text_column="review", label_column="sentiment")["n"] == 20


def test_character_noise_evaluation(tmp_path: Path) -> None:
    import random

    from duoclass.robust.noise import perturb_chars

    rng = random.Random(0)
    assert perturb_chars("这家酒店很好 great hotel", 0.0, rng) == "这家酒店很好 great hotel"
    noisy = [perturb_chars("这家酒店的服务很好，房间也干净", 0.3, random.Random(s)) for s in range(20)]
    assert sum(n != "这家酒店的服务很好，房间也干净" for n in noisy) >= 18  # 30% per character changes almost every text
    assert all(set(n) <= set("这家酒店的服务很好，房间也干净") for n in noisy)  # Chinese noise stays Chinese
    from .test_text import make_toy

    data = make_toy(tmp_path / "toy", 200, 40)
    clf = duoclass.train(data, model="tfidf-mlp", epochs=3, progress=False, tensorboard=False, workers=0,
                         output=str(tmp_path / "run"))
    m = clf.evaluate(data, char_noise=[0.0, 0.5])
    clean, zero, heavy = m["accuracy"], m["char_noise"][0]["accuracy"], m["char_noise"][1]["accuracy"]
    assert zero == clean and heavy < clean  # rate 0 is the clean text; half the characters changed costs accuracy
    r = run_cli("evaluate", str(tmp_path / "run" / "model"), str(data), "--char-noise", "0.05,2")
    assert r.returncode == 2 and "--char-noise" in r.stderr


def test_a_step_can_report_metrics_and_stop_the_run(digits: Path, tmp_path: Path) -> None:
    """step.after_epoch's metrics land in the epoch log; its stop reason ends the run without keeping that epoch."""
    import csv as csv_

    from duoclass.training.loop import fit
    from duoclass.training.steps import standard_step

    class Watched:
        def __call__(self, ctx, inputs, labels):
            return standard_step(ctx, inputs, labels)

        def describe(self):
            return {"step": "watched"}

        def after_epoch(self, model, epoch):
            return {"metrics": {"watch": float(epoch)}, **({"stop": "it went wrong"} if epoch == 1 else {})}

    cfg = _settings(digits, tmp_path / "run", epochs=5)
    result = fit(cfg, prepare(cfg), step=Watched())
    rows = list(csv_.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # stopped after the second epoch
    assert [r["valid_watch"] for r in rows] == ["0.0", "1.0"]
    assert result.best_epoch == 1  # the epoch that asked to stop is not kept
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["training"]["step"] == "watched"
