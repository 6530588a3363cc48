"""`duoclass tune`: Optuna over the shared engine for text and images, pruning through engine.fit's
on_epoch, a resumable SQLite study, best.yaml that `train --config` reads; and per-model lr defaults."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from duoclass.cli import commands as cli
from duoclass.settings.config import TrainConfig
from duoclass.training.tune import tune

from .test_text import toy_rows, write_csv

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.timeout(120)

QUIET = dict(progress=False, tensorboard=False, device="cpu", explain_examples=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tune") / "toy"
    write_csv(root / "train.csv", toy_rows(120, "train", 0))
    write_csv(root / "valid.csv", toy_rows(30, "valid", 1))
    return root


class PruneTrial1(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report; deterministic, unlike a median of random trials."""

    def prune(self, study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> bool:
        return trial.number == 1


def _train_config(best_yaml: Path) -> TrainConfig:
    ns = cli.build_parser().parse_args(["train", "--config", str(best_yaml)])
    return cli.config_from_args(ns)


def test_text_study_prunes_writes_best_yaml_and_resumes(toy: Path, tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    base = TrainConfig(data=str(toy), model="fasttext", epochs=2, **QUIET)
    summary = tune(base, trials=2, study_dir=study_dir, pruner=PruneTrial1())
    assert summary["trials"] == {"complete": 1, "pruned": 1, "failed": 0, "total": 2}
    study = optuna.load_study(study_name="duoclass", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert list(study.trials[1].intermediate_values) == [1]  # reported once, then stopped
    # the first trial of a new study is the settings as given (here fasttext's defaults)
    assert study.trials[0].params == pytest.approx(
        {"lr": 1e-2, "batch_size": 64, "weight_decay": 0.05, "label_smoothing": 0.1, "max_length": 128})
    # the pruned trial's run ended after its first epoch, its files complete (a trial keeps no training state)
    rows = list(csv.DictReader((study_dir / "trial-1" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and (study_dir / "trial-1" / "model" / "config.json").is_file()
    assert not (study_dir / "trial-1" / "state.pt").exists()
    assert len(list(csv.DictReader((study_dir / "trial-0" / "metrics.csv").open()))) == 2

    # best.yaml: data, model, the searched parameters, and what `train --config` needs
    best = study.best_trial
    assert set(best.params) == {"lr", "batch_size", "weight_decay", "label_smoothing", "max_length"}
    assert 1e-3 <= best.params["lr"] <= 1e-1  # 1/10x..10x fasttext's recommended 1e-2
    cfg = _train_config(study_dir / "best.yaml")
    assert (cfg.data, cfg.model, cfg.epochs) == (str(toy), "fasttext", 2)
    assert cfg.lr == pytest.approx(best.params["lr"]) and cfg.max_length == best.params["max_length"]
    assert cfg.batch_size == best.params["batch_size"] and cfg.output == str(study_dir / "best")
    assert summary["best_value"] == pytest.approx(best.value) and summary["best_trial"] == 0
    assert json.loads((study_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))

    # resuming adds trials: numbering goes on, the earlier ones stay
    again = tune(base, trials=1, study_dir=study_dir, pruner=PruneTrial1())
    assert again["trials"]["total"] == 3 and again["trials"]["pruned"] == 1
    assert (study_dir / "trial-2" / "metrics.csv").is_file()


@pytest.mark.slow  # long: runs with `make test-slow`
def test_image_study(digits: Path, tmp_path: Path) -> None:
    base = TrainConfig(data=str(digits), model="msresnet-tiny", image_size=16, epochs=1, augment="none", **QUIET)
    summary = tune(base, trials=3, study_dir=tmp_path / "img")
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 3
    assert "max_length" not in summary["best_params"] and "image_size" not in summary["best_params"]
    cfg = _train_config(tmp_path / "img" / "best.yaml")
    assert cfg.image_size == 16 and cfg.model == "msresnet-tiny" and cfg.augment == "none"  # the fixed settings
    assert cfg.lr == pytest.approx(summary["best_params"]["lr"])


def test_cli_flags_are_fixed(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study_dir = tmp_path / "cli"
    rc = cli.main(["tune", str(toy), "--model", "fasttext", "--trials", "1", "--epochs", "1", "--lr", "0.02",
                   "--batch-size", "32", "--study-dir", str(study_dir), "--device", "cpu", "--no-progress", "--no-tensorboard"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "lr" not in summary["best_params"] and "batch_size" not in summary["best_params"]
    saved = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert saved["lr"] == 0.02 and saved["batch_size"] == 32 and saved["epochs"] == 1
    # fixed flags are not searched, so the first trial holds only the searched settings at their defaults
    assert summary["best_params"] == pytest.approx({"weight_decay": 0.05, "label_smoothing": 0.1, "max_length": 128})
    assert "weight_decay" in saved and "output" in saved

    with pytest.raises(SystemExit) as e:  # trials write to --study-dir; tune has no --output
        cli.main(["tune", str(toy), "--trials", "1", "--output", str(tmp_path / "x")])
    assert e.value.code == 2 and "unrecognized arguments: --output" in capsys.readouterr().err


def test_on_epoch_exception_ends_fit(toy: Path, tmp_path: Path) -> None:
    """engine.fit's on_epoch hook: called after each validation; what it raises comes out of fit."""
    from duoclass.training.run import prepare, resolve_settings
    from duoclass.training.loop import fit

    cfg = resolve_settings(TrainConfig(data=str(toy), model="fasttext", epochs=3, output=str(tmp_path / "run"), **QUIET))
    seen: list[tuple[int, float]] = []

    class Stop(Exception):
        pass

    def on_epoch(epoch: int, valid: dict) -> None:
        seen.append((epoch, valid["f1_macro"]))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, prepare(cfg), on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2]
    assert len(list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))) == 2


# --- learning-rate defaults ------------------------------------------------------------------------
@pytest.mark.parametrize("model, task, lr", [
    ("msresnet-tiny", "image", 2e-3), ("timm:resnet18", "image", 2e-3), ("fasttext", "text", 1e-2),
    ("albert-scratch-tiny", "text", 1e-3), ("hf:albert-base-v2", "text", 5e-5),
])
def test_lr_defaults_per_model(model: str, task: str, lr: float, tmp_path: Path) -> None:
    from duoclass.training.run import resolve_settings

    cfg = resolve_settings(TrainConfig(data="x", task=task, model=model))
    assert cfg.lr == lr
    assert resolve_settings(TrainConfig(data="x", task=task, model=model, lr=0.5)).lr == 0.5  # a given lr wins


def test_lr_default_of_a_pretrain_folder_and_config_yaml(toy: Path, tmp_path: Path) -> None:
    from duoclass.training.run import resolve_settings
    from duoclass.models import HF_SMALL_LR

    folder = tmp_path / "mlm"
    folder.mkdir()
    (folder / "pretrain.json").write_text("{}")
    assert resolve_settings(TrainConfig(data="x", task="text", model=f"hf:{folder}")).lr == HF_SMALL_LR
    import duoclass

    duoclass.train(toy, model="fasttext", epochs=1, output=str(tmp_path / "run"), **QUIET)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 1e-2  # the value used is recorded


@pytest.mark.timeout(300)
def test_adversarial_trials_train_with_the_adversarial_step(digits: Path, tmp_path: Path) -> None:
    """Holds: every trial of `tune --adversarial fgsm` trains with the FGSM step (training.run builds the step
    the settings choose), and its model folder records it; best.yaml keeps the setting."""
    base = TrainConfig(data=str(digits), model="msresnet-tiny", image_size=16, epochs=1, augment="none",
                       adversarial="fgsm", eps="4/255", **QUIET)
    tune(base, trials=2, study_dir=tmp_path / "adv", pruner=optuna.pruners.NopPruner())
    for trial in ("trial-0", "trial-1"):  # the first runs the settings as given, the second searched ones
        training = json.loads((tmp_path / "adv" / trial / "model" / "config.json").read_text())["training"]
        assert training["step"] == "adversarial" and training["mode"] == "fgsm", training
        assert training["eps"] == pytest.approx(4 / 255)
        rows = list(csv.DictReader((tmp_path / "adv" / trial / "metrics.csv").open()))
        assert rows[0]["valid_pgd_accuracy"] != ""  # the adversarial step's own validation ran
    assert yaml.safe_load((tmp_path / "adv" / "best.yaml").read_text())["adversarial"] == "fgsm"


def test_trials_never_look_at_the_test_split(toy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Holds: tune chooses on valid only: no trial evaluates (or logs) the test split."""
    write_csv(toy.parent / "with-test" / "train.csv", toy_rows(60, "train", 0))
    write_csv(toy.parent / "with-test" / "valid.csv", toy_rows(20, "valid", 1))
    write_csv(toy.parent / "with-test" / "test.csv", toy_rows(20, "test", 2))
    caplog.set_level("INFO", logger="duoclass")
    tune(TrainConfig(data=str(toy.parent / "with-test"), model="fasttext", epochs=1, **QUIET), trials=1,
         study_dir=tmp_path / "s")
    m = json.loads((tmp_path / "s" / "trial-0" / "metrics.json").read_text())
    assert m["test"] is None and m["valid"]["accuracy"] is not None
    logged = [r.getMessage().replace(str(tmp_path), "") for r in caplog.records]
    assert logged and not [m for m in logged if "test" in m.lower().replace("/ test 0,", "")], logged


def test_a_step_of_its_own_is_refused_with_adversarial(digits: Path, tmp_path: Path) -> None:
    """Holds: `run` never silently drops the settings' step: an explicit step together with --adversarial is an error."""
    from duoclass.errors import DuoclassError
    from duoclass.training.run import resolve, run
    from duoclass.training.steps import standard_step

    cfg = resolve(TrainConfig(data=str(digits), model="msresnet-tiny", image_size=16, epochs=1, adversarial="fgsm",
                              output=str(tmp_path / "run"), **QUIET))
    with pytest.raises(DuoclassError, match="--adversarial fgsm: this run trains with a step of its own"):
        run(cfg, step=standard_step)
    assert not (tmp_path / "run" / "model").exists()
