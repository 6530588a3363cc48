"""Settings: every TrainConfig value is type- and range-checked before any data is read, YAML files of
older runs still load, and the CLI flags come in groups. No training runs here."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import duoclass
from duoclass.cli import commands as cli
from duoclass.settings.config import GROUPS, PretrainConfig, TrainConfig
from duoclass.settings.augment import PRESETS, Augment, resolve_augment
from duoclass.errors import DuoclassError
from duoclass.report.metrics import SELECTABLE_METRICS, classification_metrics, selectable_metrics

from .conftest import ROOT, run_cli


# --- wrong types name the flag -------------------------------------------------------------------
@pytest.mark.parametrize("settings, needles", [
    ({"lr": "abc"}, ["--lr: got 'abc'", "expected a number", "e.g. --lr 1e-3"]),
    ({"epochs": "x"}, ["--epochs: got 'x'", "expected a whole number", "e.g. --epochs 12"]),
    ({"epochs": 2.5}, ["--epochs: got 2.5", "whole number"]),
    ({"epochs": True}, ["--epochs: got True", "whole number"]),
    ({"amp": "yes"}, ["--amp: got 'yes'", "true or false", "--no-amp"]),
    ({"tta": 1}, ["--tta: got 1", "true or false"]),
    ({"dropout": "lots"}, ["--dropout: got 'lots'", "a number"]),
    ({"lr": float("nan")}, ["--lr: got nan", "a number"]),
    ({"model": 3}, ["--model: got 3", "expected text"]),
    ({"schedule": "cosin"}, ["--schedule: got 'cosin'", "choose one of", "linear"]),
])
def test_wrong_types_name_the_flag(tmp_path: Path, settings: dict, needles: list[str]) -> None:
    with pytest.raises(DuoclassError) as e:
        duoclass.train(tmp_path / "never_read", output=str(tmp_path / "run"), **settings)
    for needle in needles:
        assert needle in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before any file was written


def test_numeric_strings_and_ints_are_converted() -> None:
    """YAML reads `lr: 1e-3` as a string; ints are fine where a float is expected; a path is fine for text."""
    cfg = TrainConfig(lr="1e-3", epochs="3", warmup_epochs=2, rotation=10, batch_size=8.0, output=Path("runs") / "x")
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.warmup_epochs == 2.0 and isinstance(cfg.warmup_epochs, float)
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.output == str(Path("runs") / "x")


def test_yaml_with_a_wrong_type_names_the_flag(tmp_path: Path) -> None:
    p = tmp_path / "settings.yaml"
    p.write_text("lr: 1e-3\namp: 'no'\n", encoding="utf-8")
    with pytest.raises(DuoclassError, match="--amp: got 'no'; expected true or false"):
        TrainConfig.from_yaml(p, data="x")
    p.write_text("lr: 1e-3\nepochs: '4'\n", encoding="utf-8")
    cfg = TrainConfig.from_yaml(p, data="x")
    assert (cfg.lr, cfg.epochs) == (1e-3, 4)


def test_cli_wrong_type_is_one_error_line(tmp_path: Path) -> None:
    """argparse's own 'invalid float value' usage dump is replaced by the settings' message."""
    r = run_cli("train", str(tmp_path / "data"), "--lr", "abc", "--output", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --lr: got 'abc'; expected a number, e.g. --lr 1e-3"]
    assert not (tmp_path / "run").exists()


# --- --select-metric ------------------------------------------------------------------------------
def test_select_metric_typo_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(DuoclassError) as e:
        duoclass.train(tmp_path / "never_read", select_metric="f1-macro", output=str(tmp_path / "run"))
    msg = str(e.value)
    assert msg.startswith("--select-metric: unknown metric 'f1-macro'") and "did you mean f1_macro?" in msg
    assert not (tmp_path / "run").exists()  # no half-made run folder


def test_selectable_metrics_are_what_evaluation_returns() -> None:
    """The list --select-metric checks against is exactly the float scores of classification_metrics, plus loss."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=40)
    for top_k in (3, 5):
        m = classification_metrics(rng.integers(0, 7, 40), probs, [str(i) for i in range(7)], top_k=top_k, loss=0.5)
        floats = {k for k, v in m.items() if isinstance(v, float)}
        assert floats == set(selectable_metrics(top_k))
        assert set(SELECTABLE_METRICS) <= floats
    for name in selectable_metrics(3):
        assert TrainConfig(select_metric=name, top_k=3).select_metric == name


# --- ranges ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, bad, good", [
    ("rotation", [-1, 181], [0, 180]),
    ("translate", [-0.1, 1.0], [0, 0.99]),
    ("scale", [-0.1, 1.0, 1.5], [0, 0.5]),
    ("color_jitter", [-0.1, 1.01], [0, 1]),
    ("random_resized_crop", [-0.1, 1.0], [0, 0.35]),
    ("hflip", [-0.1, 1.1], [0, 1]),
    ("vflip", [-0.1, 1.1], [0, 1]),
    ("max_steps", [-1], [0, 100]),
])
def test_impossible_values_are_refused(name: str, bad: list, good: list) -> None:
    flag = "--" + name.replace("_", "-")
    for v in bad:
        with pytest.raises(DuoclassError, match=f"^{flag}: got {v}"):
            TrainConfig(**{name: v})
    for v in good:
        assert getattr(TrainConfig(**{name: v}), name) == v


def test_max_steps_and_linear_schedule_are_settings() -> None:
    cfg = TrainConfig(max_steps=50, schedule="linear")
    assert (cfg.max_steps, cfg.schedule) == (50, "linear")
    assert TrainConfig().max_steps == 0  # all epochs


# --- removed settings, older config.yaml files -----------------------------------------------------
def test_log_every_is_gone_but_old_run_configs_still_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert "log_every" not in {f.name for f in dataclasses.fields(TrainConfig)}
    old = TrainConfig(data="data/x", epochs=3).to_dict()
    old["log_every"] = 10  # what a run of an earlier version saved
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(old, sort_keys=False), encoding="utf-8")
    with caplog.at_level("WARNING", logger="duoclass"):
        cfg = TrainConfig.from_yaml(saved, epochs=5)
    assert (cfg.data, cfg.epochs) == ("data/x", 5)
    assert any("log_every" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    # other unknown names are still an error
    saved.write_text("epochs: 3\nlog_evry: 10\n", encoding="utf-8")
    with pytest.raises(DuoclassError, match="unknown setting"):
        TrainConfig.from_yaml(saved)


# --- what moved into config.py -------------------------------------------------------------------
def test_config_imports_no_torch() -> None:
    """The settings (and the CLI parser built from them) load without torch or the image code."""
    code = (
        "import sys, types\n"
        f"sys.path.insert(0, {str(ROOT / 'src')!r})\n"
        "pkg = types.ModuleType('duoclass'); pkg.__path__ = [sys.path[0] + '/duoclass']; sys.modules['duoclass'] = pkg\n"
        "import duoclass.settings.config as c, duoclass.cli.commands\n"
        "c.TrainConfig(data='x', lr='1e-3', select_metric='f1_macro', text_augment='light')\n"
        "c.PretrainConfig(corpus='x')\n"
        "print(sorted(m for m in ('torch', 'duoclass.training.image_data', 'duoclass.training.pretrain') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_augment_presets_resolve_from_config() -> None:
    cfg = TrainConfig(augment="light", rotation=5)
    assert resolve_augment(cfg) == Augment(rotation=5, translate=0.1, hflip=0.5)
    assert set(PRESETS) >= {"default", "light", "flip", "all", "crop", "none"}
    assert PretrainConfig(corpus="x").model == "albert-scratch-tiny"


# --- the CLI --------------------------------------------------------------------------------------
def test_every_train_flag_is_in_a_titled_group() -> None:
    fields = dataclasses.fields(TrainConfig)
    assert {f.metadata.get("group") for f in fields} == set(GROUPS)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    titles = {g.title: g for g in train._action_groups}
    assert list(GROUPS) == [t for t in titles if t in GROUPS]  # in the documented order
    for f in fields:
        group = titles[f.metadata["group"]]
        dests = {a.dest for a in group._group_actions}
        assert f.name in dests, (f.name, f.metadata["group"])
    help_text = train.format_help()
    for title in GROUPS:
        assert f"\n{title}:\n" in help_text


@pytest.mark.parametrize("argv, expected", [
    (["train", "d", "--nproc", "2", "--epochs", "3"], ["train", "d", "--epochs", "3"]),
    (["train", "d", "--nproc=2", "--epochs", "3"], ["train", "d", "--epochs", "3"]),
    (["-q", "train", "d", "--npro=2"], ["-q", "train", "d"]),
    (["train", "d", "--no-amp", "--nproc", "2"], ["train", "d", "--no-amp"]),
])
def test_nproc_is_removed_in_both_spellings(argv: list[str], expected: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).nproc == 2
    assert cli.without_nproc(argv) == expected


def test_models_timm_plain_word_matches_inside_names(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["models", "--timm", "resnet1"]) == 0
    names = capsys.readouterr().out.split()
    assert "timm:resnet18" in names and "timm:resnet10t" in names
    assert all("resnet1" in n for n in names)
    assert cli.main(["models", "--timm", "zz_no_such_net"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        "error: --timm zz_no_such_net: no timm model name matches '*zz_no_such_net*'; try a shorter part of the name, "
        "e.g. `duoclass models --timm resnet`, or `--timm` alone for all of them"]


def test_help_does_not_import_torch() -> None:
    """`duoclass train --help` and the parser load no torch (a plain `import torch` in the CLI fails this, never skips it)."""
    r = subprocess.run([sys.executable, "-m", "duoclass", "train", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "optimisation:" in r.stdout
    code = ("import sys, duoclass.cli.commands as c\n"
            "c.build_parser()\n"
            "try:\n    c.main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip().splitlines()[-1]  # the help text itself comes first
    assert "torch" not in loaded, f"the CLI imports torch before any command runs: {loaded}"
