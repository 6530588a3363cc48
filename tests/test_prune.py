"""Structured pruning of msresnet: a smaller dense network that rebuilds from config.json, with and without fine-tuning.

The trained model is msresnet-tiny at 16 px, one epoch on scikit-learn's digits.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import duoclass
from duoclass.artifacts.folder import model_folder_config, read_model_folder, save_model_folder
from duoclass.errors import DuoclassError
from duoclass.models import count_flops, count_params, create_model
from duoclass.models.msresnet import SIZES, channel_plan, default_plan
from duoclass.compress.prune import format_report, kept_count, prune_model_folder, prune_msresnet

pytestmark = pytest.mark.timeout(300)

FAST = dict(progress=False, tensorboard=False, device="cpu", seed=0, explain_examples=0)


@pytest.fixture(scope="module")
def source(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained msresnet-tiny model folder (RUN/model, with RUN/config.yaml beside it)."""
    out = tmp_path_factory.mktemp("prune") / "run"
    duoclass.train(digits, output=str(out), model="msresnet-tiny", image_size=16, epochs=1, augment="none", **FAST)
    return out / "model"


@pytest.fixture(scope="module")
def pruned(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("pruned") / "half"
    return prune_model_folder(source, amount=0.5, output=out, device="cpu"), out


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def randomise_bn(model: nn.Module) -> None:
    """Trained-looking BN layers (fresh ones are the identity, and the fuse BNs start at zero)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)


# --- the builder ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(SIZES))
def test_explicit_default_plan_builds_the_same_model(size: str) -> None:
    """channels= with the size's own plan is the default model, weight for weight (same seed, same init order)."""
    torch.manual_seed(0)
    a = create_model(f"msresnet-{size}", 4, image_size=16).state_dict()
    torch.manual_seed(0)
    plan = json.loads(json.dumps(default_plan(**SIZES[size])))  # as read back from config.json
    b = create_model(f"msresnet-{size}", 4, image_size=16, channels=plan)
    assert channel_plan(b.backbone) == plan
    b = b.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_plan_that_cannot_be_built_is_refused() -> None:
    plan = default_plan(**SIZES["tiny"])
    plan["stages"][0][0]["out"] = 20  # identity shortcut from the 24-wide stem
    with pytest.raises(DuoclassError, match=r"stages\[0\]\[0\]: an identity shortcut needs out == .* 24"):
        create_model("msresnet-tiny", 4, image_size=16, channels=plan)
    with pytest.raises(DuoclassError, match="blocks per stage"):
        create_model("msresnet-tiny", 4, image_size=16, channels=default_plan(**SIZES["small"]))


# --- the pruning itself -------------------------------------------------------------------------
@pytest.mark.parametrize("size,image_size", [("tiny", 16), ("small", 48), ("base", 96)])  # every size and stem
def test_pruned_network_computes_the_masked_network(size: str, image_size: int) -> None:
    """Zeroing the BN of every removed channel in the original silences exactly those channels; the
    smaller network gives the same logits, so every coupling (streams, concatenation, head) is right."""
    torch.manual_seed(0)
    name, args = f"msresnet-{size}", {"image_size": image_size}
    model = create_model(name, 5, **args)
    randomise_bn(model)
    model.eval()
    small, groups = prune_msresnet(model, 0.5, name, args)
    assert all(len(g.keep) == kept_count(g.size, 0.5) for g in groups)
    for g in groups:
        drop = [i for i in range(g.size) if i not in g.keep]
        for _, bn in g.writers:
            bn.weight.data[drop] = 0
            bn.bias.data[drop] = 0
    x = {"pixel_values": torch.rand(3, 3, image_size, image_size)}
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert 0.23 < count_params(small) / count_params(model) < 0.28  # ~ (1 - 0.5)^2
    assert 0.23 < count_flops(small, image_size) / count_flops(model, image_size) < 0.28


def test_pruning_that_removes_nothing_changes_nothing() -> None:
    torch.manual_seed(1)
    model = create_model("msresnet-tiny", 3, image_size=16)
    randomise_bn(model)
    model.eval()
    same, _ = prune_msresnet(model, 0.005, "msresnet-tiny", {"image_size": 16})  # rounds to 0 channels everywhere
    x = {"pixel_values": torch.rand(2, 3, 16, 16)}
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


# --- model folders ------------------------------------------------------------------------------------
def test_pruned_folder_is_smaller_and_loads(source: Path, pruned: tuple[dict, Path], digits: Path) -> None:
    report, out = pruned
    b, a = report["before"], report["after"]
    assert 0.22 < a["params"] / b["params"] < 0.3 and 0.22 < a["flops"] / b["flops"] < 0.3
    assert a["file_bytes"] < 0.35 * b["file_bytes"]
    assert a["images_per_second"] > 0 and b["test_accuracy"] is not None and a["test_accuracy"] is not None
    # a genuinely smaller network: every conv has half the filters, each of half the input channels (RGB stays 3)
    original = duoclass.load(source, device="cpu").model
    clf = duoclass.load(out, device="cpu")
    for old, new in zip(convs(original), convs(clf.model), strict=True):
        cin = 3 if old.in_channels == 3 else kept_count(old.in_channels, 0.5)
        assert new.weight.shape == (kept_count(old.out_channels, 0.5), cin, *old.kernel_size)
    assert clf.model.backbone.fc.in_features == sum(kept_count(w, 0.5) for w in SIZES["tiny"]["widths"])
    cfg, _ = read_model_folder(out)
    assert cfg["model"]["args"]["channels"] == report["plan"] == channel_plan(clf.model.backbone)
    assert cfg["training"]["pruning"]["amount"] == 0.5 and cfg["training"]["pruning"]["source"] == str(source)
    assert cfg["training"]["pruning"]["bn_calibration_images"] == report["bn_calibration_images"] == 512
    assert cfg["preprocessing"] == read_model_folder(source)[0]["preprocessing"]
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy"] == a["test_accuracy"]
    images = sorted((digits / "test" / "7").iterdir())[:4]
    assert all(label in clf.classes_ for label in clf.predict(images))
    text = format_report(report)
    assert "parameters" in text and "FLOPs at 16 px" in text and str(out) in text


def test_finetune_one_epoch_through_fit(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    report = prune_model_folder(source, amount=0.3, output=out, finetune_epochs=1, device="cpu", batch_size=128)
    assert report["model_dir"] == str(out / "model") and (out / "metrics.json").is_file() and (out / "config.yaml").is_file()
    assert report["settings_from"] == str(source.parent / "config.yaml")
    cfg, _ = read_model_folder(out / "model")
    assert cfg["training"]["epochs"] == 1 and cfg["training"]["step"] == "standard"
    assert cfg["training"]["pruning"] == {"amount": 0.3, "method": report["method"], "source": str(source),
                                          "source_config_sha256": read_model_folder(source)[0]["config_sha256"],
                                          "bn_calibration_images": 512, "finetune_epochs": 1}
    clf = duoclass.load(out / "model", device="cpu")
    assert convs(clf.model)[-1].out_channels == kept_count(SIZES["tiny"]["widths"][-1], 0.3)
    assert report["ratios"]["flops"] < 0.6 and report["after"]["test_accuracy"] is not None
    run = json.loads((out / "metrics.json").read_text())
    assert run["best_epoch"] == 1 and run["test"]["accuracy"] == pytest.approx(report["after"]["test_accuracy"])


def test_bn_calibration_changes_only_the_running_statistics(source: Path, pruned: tuple[dict, Path],
                                                           tmp_path: Path) -> None:
    """The same channels are kept either way; re-estimating the BN statistics on training images changes
    running_mean / running_var (and the batch counter) and nothing else, and is recorded."""
    report = prune_model_folder(source, amount=0.5, output=tmp_path / "raw", calibrate=0, device="cpu")
    assert report["bn_calibration_images"] == 0 and report["plan"] == pruned[0]["plan"]
    raw, calibrated = read_model_folder(tmp_path / "raw")[1], read_model_folder(pruned[1])[1]
    assert sorted(raw) == sorted(calibrated)
    for k in raw:
        if k.endswith(("running_mean", "running_var")):
            assert not torch.equal(raw[k], calibrated[k]), k
        elif not k.endswith("num_batches_tracked"):  # the calibration's batches
            assert torch.equal(raw[k], calibrated[k]), k


# --- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amount", [0, 1, 1.5, -0.1, True, float("nan")])
def test_amount_outside_0_1_is_refused(amount: float, tmp_path: Path) -> None:
    with pytest.raises(DuoclassError, match=r"--amount .*between 0 and 1"):
        prune_model_folder(tmp_path / "not-read-yet", amount=amount)


def test_a_model_that_is_not_msresnet_is_refused(tmp_path: Path) -> None:
    model = create_model("fasttext", 2, buckets=512, dim=8)
    cfg = model_folder_config("text", "fasttext", {"buckets": 512, "dim": 8}, ["neg", "pos"],
                              {"tokenizer": "ngram-hash", "max_length": 16})
    save_model_folder(tmp_path / "ft", model.state_dict(), cfg)
    with pytest.raises(DuoclassError, match="structured pruning supports msresnet; .* holds fasttext"):
        prune_model_folder(tmp_path / "ft", amount=0.3)


def test_finetuning_needs_its_data(source: Path, tmp_path: Path) -> None:
    cfg, state = read_model_folder(source)
    keep = ("task", "classes", "preprocessing", "evaluation", "inputs")
    moved = model_folder_config(**{k: cfg[k] for k in keep}, model_name=cfg["model"]["name"],
                                model_args=cfg["model"]["args"], training={**cfg["training"], "data": str(tmp_path / "gone")})
    save_model_folder(tmp_path / "moved", state, moved)
    with pytest.raises(DuoclassError, match=r"--finetune 1: training data not found: .*gone.*--data DIR"):
        prune_model_folder(tmp_path / "moved", amount=0.3, output=tmp_path / "out", finetune_epochs=1)
    with pytest.raises(DuoclassError, match="--data .*nowhere: no such file or folder"):
        prune_model_folder(source, amount=0.3, output=tmp_path / "out", data=tmp_path / "nowhere")


def test_settings_and_outputs_that_would_do_harm_are_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(DuoclassError, match="only apply to fine-tuning"):
        prune_model_folder(source, amount=0.3, output=tmp_path / "o", lr=1e-3)
    with pytest.raises(DuoclassError, match="'epochs' cannot be changed here; pass finetune_epochs="):
        prune_model_folder(source, amount=0.3, output=tmp_path / "o", finetune_epochs=1, epochs=3)
    for output, epochs in ((source, 0), (source.parent, 0), (source.parent, 1), (source / "inner", 0)):
        with pytest.raises(DuoclassError, match="would overwrite or nest inside the source model folder"):
            prune_model_folder(source, amount=0.3, output=output, finetune_epochs=epochs)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(DuoclassError, match="exists and is not a model folder"):
        prune_model_folder(source, amount=0.3, output=tmp_path / "notes")
    assert duoclass.load(source, device="cpu").model is not None  # the source is untouched
