"""Explanations: they point at what decides the class (synthetic data with known answers), they change when the
weights are randomised (Adebayo et al. 2018), integrated gradients are complete, and every refusal is one clear
line. The same checks on the real chest X-rays and SST-2 are in tests/test_slow.py and benchmarks/explain.py.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import duoclass
from duoclass.errors import DuoclassError
from duoclass.explain import checks
from duoclass.explain.checks import pointing_hit, randomized_copy, spearman
from duoclass.infer.explain import log_odds, pick_examples
from duoclass.infer.torch_backend import TorchBackend
from tests.conftest import run_cli

FAST = dict(seed=0, device="cpu", batch_size=32, bootstrap=0)


@pytest.fixture(scope="module")
def patch_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checks.write_patch_images(tmp_path_factory.mktemp("patch") / "data", n_train=450, n_valid=90, n_test=90)


@pytest.fixture(scope="module")
def patch_run(patch_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patch-run")
    duoclass.train(str(patch_data), model="msresnet-tiny", epochs=6, lr=3e-3, output=str(out), **FAST)
    return out


@pytest.fixture(scope="module")
def patch_clf(patch_run: Path) -> duoclass.Classifier:
    return duoclass.load(patch_run / "model", device="cpu")


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checks.write_keyword_texts(tmp_path_factory.mktemp("kw") / "data", n_train=800, n_valid=100, n_test=100)


@pytest.fixture(scope="module")
def keyword_models(keyword_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, duoclass.Classifier]:
    out = {}
    for name, kw in {"tfidf-mlp": dict(epochs=5, lr=1e-2), "albert-scratch-tiny": dict(epochs=8, lr=1e-3)}.items():
        run = tmp_path_factory.mktemp(name)
        duoclass.train(str(keyword_data), model=name, output=str(run), explain_examples=0, **kw, **FAST)
        out[name] = duoclass.load(run / "model", device="cpu")
    return out


def patch_test_images(patch_data: Path) -> tuple[list[str], list[list[int]]]:
    boxes = json.loads((patch_data / "boxes.json").read_text())
    return [str(patch_data / k) for k in boxes], list(boxes.values())


def hit_rate(ex, boxes, paths) -> tuple[float, int]:
    """Pointing-game hits over correctly classified images (the class is the folder name)."""
    hits = [pointing_hit(e.attributions, b) for e, b, p in zip(ex, boxes, paths)
            if e.ok and e.label == e.target == Path(p).parent.name]
    return float(np.mean(hits)), len(hits)


# --- the pointing game ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,at_least,n", [("gradcam", 0.9, 90), ("gradcam++", 0.9, 90), ("occlusion", 0.85, 30)])
def test_the_peak_falls_on_the_patch_that_decides_the_class(method, at_least, n, patch_clf, patch_data) -> None:
    paths, boxes = patch_test_images(patch_data)
    ex = patch_clf.explain(paths[:n], method=method)
    rate, counted = hit_rate(ex, boxes, paths)
    assert counted >= 0.9 * n  # the model learned the task: the game is played on correct predictions
    assert rate >= at_least, f"{method}: peak on the patch in {rate:.2f} of {counted}"


def test_a_model_that_ignores_the_patch_fails_the_pointing_game(patch_clf, patch_data) -> None:
    """The check can fail: the randomised network's Grad-CAM peaks land on the patch about as often as chance."""
    paths, boxes = patch_test_images(patch_data)
    twin = duoclass.Classifier(TorchBackend(randomized_copy(patch_clf.model), "cpu"), patch_clf.classes_,
                               patch_clf.preprocessor, patch_clf.config_)
    ex = twin.explain(paths[:60], method="gradcam", target="bars")
    hits = np.mean([pointing_hit(e.attributions, b) for e, b in zip(ex, boxes[:60])])
    assert hits < 0.5


@pytest.mark.parametrize("name,method", [("tfidf-mlp", "occlusion"), ("albert-scratch-tiny", "occlusion"),
                                         ("albert-scratch-tiny", "ig")])
def test_the_keyword_gets_the_top_attribution(name, method, keyword_models, keyword_data) -> None:
    keys = json.loads((keyword_data / "keywords.json").read_text())
    rows = [r for r in csv.DictReader(open(keyword_data / "test.csv", encoding="utf-8")) if r["id"] in keys]
    ex = keyword_models[name].explain([r["text"] for r in rows], method=method)
    scored = [(e, r) for e, r in zip(ex, rows) if e.ok and e.label == r["label"]]
    assert len(scored) >= 0.9 * len(rows)
    hits = [e.top_units(1)[0]["text"] == keys[r["id"]] for e, r in scored]
    assert np.mean(hits) >= 0.9, f"{name} {method}: keyword on top in {np.mean(hits):.2f}"


# --- model randomisation (Adebayo et al. 2018) -----------------------------------------------------------
def test_explanations_of_trained_and_randomised_weights_differ(patch_clf, patch_data, keyword_models, keyword_data) -> None:
    from duoclass.explain.checks import randomization_check

    paths, _ = patch_test_images(patch_data)
    r = randomization_check(patch_clf, paths[:40], "gradcam")
    assert r["n"] == 40 and r["share_below_0_5"] >= 0.9, r["spearman"]
    texts = [row["text"] for row in csv.DictReader(open(keyword_data / "test.csv", encoding="utf-8"))][:40]
    r = randomization_check(keyword_models["albert-scratch-tiny"], texts, "ig")
    assert r["n"] == 40 and r["share_below_0_5"] >= 0.9, r["spearman"]
    assert patch_clf.backend.model is not None and patch_clf.model.training is False  # the trained model is untouched


def test_the_randomization_check_fails_a_map_that_ignores_the_weights(patch_clf, patch_data, monkeypatch) -> None:
    """An "explanation" that is the input itself (edges, brightness) is the same for both networks: the check
    must flag it, with correlations near 1."""
    from duoclass.explain import checks, occlusion

    def the_image(scores_of, x, target, **kw):
        return x.mean(axis=0), {}

    monkeypatch.setattr(occlusion, "occlude_image", the_image)
    paths, _ = patch_test_images(patch_data)
    r = checks.randomization_check(patch_clf, paths[:10], "occlusion")
    assert r["share_below_0_5"] == 0.0 and min(r["spearman"]) > 0.99


def test_spearman_and_the_pointing_hit() -> None:
    a = np.arange(16.0).reshape(4, 4)
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.ones_like(a)) == 0.0  # a constant map has no ranking
    heat = np.zeros((8, 8))
    heat[5, 2] = 1
    assert pointing_hit(heat, (4, 1, 7, 4)) and not pointing_hit(heat, (0, 0, 5, 8)) and not pointing_hit(heat, (4, 3, 7, 8))


def test_the_randomised_copy_changes_every_layer_but_the_normalisation(patch_clf) -> None:
    twin = randomized_copy(patch_clf.model)
    before, after = patch_clf.model.state_dict(), twin.state_dict()
    for k in before:
        if k.endswith(("normalize.mean", "normalize.std")):
            assert torch.equal(before[k], after[k]), k
        elif k.endswith(".weight") and before[k].dtype.is_floating_point and before[k].numel() > 1:
            assert not torch.equal(before[k], after[k]), k
    assert patch_clf.model.training is False and next(patch_clf.model.parameters()) is not next(twin.parameters())


# --- completeness of integrated gradients ---------------------------------------------------------------
def test_integrated_gradients_sum_to_the_change_of_the_logit(patch_clf, patch_data, keyword_models, keyword_data) -> None:
    paths, _ = patch_test_images(patch_data)
    for e in patch_clf.explain(paths[:3], method="ig"):
        d = e.details
        with torch.no_grad():  # f(x) and f(black) computed here, not taken from the explanation
            x = torch.from_numpy(e.pixels[None].astype(np.float32) / 255)
            t = list(patch_clf.classes_).index(e.target)
            f = patch_clf.model({"pixel_values": torch.cat([x, torch.zeros_like(x)])})[:, t]
        assert abs(float(e.attributions.sum()) - float(f[0] - f[1])) <= 0.05 * abs(float(f[0] - f[1]))
        assert d["complete"] and d["steps"] >= 32
    clf = keyword_models["albert-scratch-tiny"]
    texts = [r["text"] for r in csv.DictReader(open(keyword_data / "test.csv", encoding="utf-8"))][:3]
    for e in clf.explain(texts, method="ig"):
        d = e.details
        assert abs(float(e.attributions.sum()) - (d["f_x"] - d["f_baseline"])) <= 0.05 * abs(d["f_x"] - d["f_baseline"])
        assert d["complete"] and len(e.attributions) == len(e.spans) == len(d["tokens"])


def test_integrated_gradients_add_steps_until_complete(patch_clf, patch_data) -> None:
    """From 2 steps the integral is too coarse on this model: the steps double until the sum is within 5%."""
    paths, _ = patch_test_images(patch_data)
    e = patch_clf.explain(paths[:1], method="ig", steps=2)[0]
    assert e.details["steps"] > 2 and e.details["complete"]
    assert e.details["completeness_error"] <= 0.05


def test_integrated_gradients_that_cannot_complete_are_marked_so(patch_clf, patch_data, monkeypatch, caplog) -> None:
    from duoclass.explain import gradients

    monkeypatch.setattr(gradients, "MAX_STEPS", 2)
    monkeypatch.setattr(gradients, "COMPLETENESS", 1e-9)
    paths, _ = patch_test_images(patch_data)
    e = patch_clf.explain(paths[:1], method="ig", steps=2)[0]
    assert e.details["steps"] == 2 and e.details["complete"] is False
    assert "recorded as incomplete" in caplog.text


# --- the explain path's contract ---------------------------------------------------------------------------
def test_one_bad_input_fails_only_itself(patch_clf, patch_data, tmp_path) -> None:
    paths, _ = patch_test_images(patch_data)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ex = patch_clf.explain([paths[0], str(bad), paths[1]], method="occlusion")
    assert [e.ok for e in ex] == [True, False, True]
    assert "broken.png" in ex[1].error and ex[1].attributions is None
    assert ex[0].attributions.shape == (32, 32) and ex[0].pixels.shape == (3, 32, 32)
    written = ex.save(tmp_path / "out")
    assert sorted(p.name for p in written) == [f"0000-{Path(paths[0]).stem}.png", f"0002-{Path(paths[1]).stem}.png",
                                               "explanations.json"]
    rows = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert rows[1]["error"] and np.asarray(rows[0]["attributions"]).shape == (32, 32)


def test_a_failing_method_fails_only_its_input(patch_clf, patch_data, monkeypatch) -> None:
    from duoclass.explain import occlusion

    real = occlusion.occlude_image
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise DuoclassError("the second one breaks")
        return real(*a, **k)

    monkeypatch.setattr(occlusion, "occlude_image", flaky)
    paths, _ = patch_test_images(patch_data)
    ex = patch_clf.explain(paths[:3], method="occlusion")
    assert [e.ok for e in ex] == [True, False, True] and "the second one breaks" in ex[1].error


def test_target_picks_the_class_explained(patch_clf, patch_data) -> None:
    paths, _ = patch_test_images(patch_data)
    e = patch_clf.explain(paths[:1], method="gradcam", target="checks")[0]
    assert e.target == "checks" and e.score == pytest.approx(float(patch_clf.predict_proba(paths[:1])[0, 1]), abs=1e-6)
    with pytest.raises(DuoclassError, match=r"--target 'dogs': not a class of this model \(its classes: bars, checks, stripes\)"):
        patch_clf.explain(paths[:1], target="dogs")


@pytest.mark.parametrize("method,message", [
    ("saliency", r"--method 'saliency': choose one of auto, gradcam, gradcam\+\+, occlusion, ig"),
])
def test_unknown_method_is_refused(method, message, patch_clf) -> None:
    with pytest.raises(DuoclassError, match=message):
        patch_clf.explain([], method=method)


def test_methods_a_model_lacks_are_refused(patch_clf, keyword_models) -> None:
    with pytest.raises(DuoclassError, match="Grad-CAM is for image models"):
        keyword_models["tfidf-mlp"].explain(["a text"], method="gradcam")
    with pytest.raises(DuoclassError, match="tfidf-mlp is a bag of n-grams: use --method occlusion"):
        keyword_models["tfidf-mlp"].explain(["a text"], method="ig")
    with pytest.raises(DuoclassError, match=r"--steps 1: integrated gradients need a whole number of steps >= 2"):
        patch_clf.explain([], method="ig", steps=1)


def test_auto_picks_gradcam_for_cnns_ig_for_transformers_occlusion_otherwise(patch_clf, keyword_models) -> None:
    from duoclass.infer.explain import resolve_method

    assert resolve_method(patch_clf, "auto") == "gradcam"
    assert resolve_method(keyword_models["albert-scratch-tiny"], "auto") == "ig"
    assert resolve_method(keyword_models["tfidf-mlp"], "auto") == "occlusion"


def test_gradcam_refuses_a_model_without_feature_maps(patch_clf) -> None:
    from duoclass.explain.gradients import cam_layers

    with pytest.raises(DuoclassError, match="no convolutional feature map found in Linear; use --method occlusion"):
        cam_layers(torch.nn.Linear(3, 2))
    assert len(cam_layers(patch_clf.model)) == 3  # msresnet-tiny: every stage


def test_gradient_methods_need_the_torch_backend(patch_run, patch_data, tmp_path) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(patch_run / "model", folder)
    duoclass.export(folder)
    clf = duoclass.load(folder, backend="onnx")
    with pytest.raises(DuoclassError, match=r"--method gradcam needs the model's gradients, which only --backend torch "
                                            r"has \(this is --backend onnx\); use --method occlusion"):
        clf.explain([], method="gradcam")
    paths, _ = patch_test_images(patch_data)
    onnx = clf.explain(paths[:2])  # auto: occlusion
    ref = duoclass.load(folder, device="cpu").explain(paths[:2], method="occlusion")
    assert [e.method for e in onnx] == ["occlusion", "occlusion"]
    for a, b in zip(onnx, ref):
        np.testing.assert_allclose(a.attributions, b.attributions, atol=2e-3)


def test_log_odds_are_those_of_the_calibrated_probabilities() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (1, 5, 4)).astype(np.float32)
    p = np.exp(z[0] / 1.7) / np.exp(z[0] / 1.7).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(log_odds(z, 1.7), np.log(p / (1 - p)), rtol=1e-4, atol=1e-4)
    saturated = np.array([[[60.0, 0.0]]], dtype=np.float32)  # p = 1 in float32: log-odds stay finite
    assert log_odds(saturated)[0, 0] == pytest.approx(60.0)


def test_occlusion_hides_the_patch_that_matters() -> None:
    """On a model that reads only the top-left 4x4 pixels, only windows touching them score."""
    from duoclass.explain.occlusion import occlude_image

    def scores_of(batch):
        x = batch["pixel_values"]
        s = x[:, :, :4, :4].sum(axis=(1, 2, 3))
        return np.stack([s, -s], axis=1)

    x = np.zeros((3, 16, 16), dtype=np.float32)
    x[:, :4, :4] = 1.0
    heat, d = occlude_image(scores_of, x, 0, patch=4, stride=2)
    assert heat[:4, :4].min() > 0 and np.all(heat[8:, :] == 0) and np.all(heat[:, 8:] == 0)
    assert d["forward_passes"] == 7 * 7 + 1 and d["patch"] == 4


def test_leave_one_word_out_scores_each_word(keyword_models) -> None:
    clf = keyword_models["tfidf-mlp"]
    text = "we went to the match on sunday"
    e = clf.explain([text], method="occlusion")[0]
    assert [text[s:t] for s, t in e.spans] == text.split()
    assert e.top_units(1)[0]["text"] == "match" and e.label == "sport"


def test_chinese_text_is_explained_character_by_character() -> None:
    from duoclass.preprocess.text import word_spans

    text = "房间很干净 ok!"
    assert [text[s:e] for s, e in word_spans(text)] == ["房", "间", "很", "干", "净", "ok", "!"]


# --- the report, the command line ------------------------------------------------------------------------
def test_a_run_report_has_an_explanations_grid(patch_run) -> None:
    png = patch_run / "explanations.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size[0] > 600


def test_pick_examples_takes_right_and_wrong_per_class() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55]])
    y = np.array([0, 0, 0, 1, 1, 0])
    # class 0: right 0 (0.9), 1 (0.8); wrong 5; class 1: right 4, 3; no wrong
    assert pick_examples(probs, y, 2) == [0, 1, 5, 4, 3] or pick_examples(probs, y, 2) == [0, 1, 5, 3, 4]
    assert set(pick_examples(probs, y, 1)) == {0, 5, 4}
    assert len(pick_examples(np.tile(probs, (10, 1)), np.tile(y, 10), 10, limit=4)) == 4


def test_explain_examples_zero_writes_no_grid(keyword_models) -> None:
    assert not (keyword_models["tfidf-mlp"].folder.parent / "explanations.png").exists()


def test_explain_examples_must_not_be_negative() -> None:
    from duoclass.settings.config import TrainConfig

    with pytest.raises(DuoclassError, match=r"--explain-examples: got -1; examples per class must be >= 0"):
        TrainConfig(data="x", explain_examples=-1)


def test_cli_explains_a_folder_and_a_typed_text(patch_run, patch_data, keyword_models, tmp_path) -> None:
    r = run_cli("explain", str(patch_run / "model"), str(patch_data / "test" / "bars"), "--output", str(tmp_path / "img"),
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "explained 30 of 30 inputs (gradcam)" in r.stdout
    assert len(list((tmp_path / "img").glob("*.png"))) == 30
    folder = keyword_models["albert-scratch-tiny"].folder
    r = run_cli("explain", str(folder), "rain again over the hills", "--output", str(tmp_path / "txt"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "txt" / "0000-text.html").read_text()
    assert ">rain</span>" in page and "ig: why weather" in page


def test_cli_exits_2_when_nothing_could_be_explained(patch_run, tmp_path) -> None:
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    r = run_cli("explain", str(patch_run / "model"), str(bad), "--output", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "none of its 1 inputs could be explained" in r.stderr
    assert json.loads((tmp_path / "out" / "explanations.json").read_text())[0]["error"]


def test_a_failing_gradcam_batch_fails_its_images_only(patch_clf, patch_data, monkeypatch) -> None:
    from duoclass.explain import gradients

    def broken(*a, **k):
        raise DuoclassError("no feature maps today")

    monkeypatch.setattr(gradients, "grad_cam", broken)
    paths, _ = patch_test_images(patch_data)
    ex = patch_clf.explain(paths[:3] + ["missing.png"], method="gradcam", batch_size=2)
    assert [e.ok for e in ex] == [False] * 4
    assert all("no feature maps today" in e.error for e in ex[:3]) and "missing.png" in ex[3].error
    assert all(e.attributions is None for e in ex)


def test_words_past_the_cap_are_not_scored(keyword_models) -> None:
    from duoclass.explain.occlusion import occlude_text
    from duoclass.infer.explain import log_odds
    from duoclass.infer.predict import predict_views

    clf = keyword_models["tfidf-mlp"]

    def scores_of(batch):
        return log_odds(predict_views(clf.backend, [batch]), clf.temperature)

    scores, spans, d = occlude_text(clf.preprocessor, scores_of, "one two three rain five", 0, max_words=3)
    assert len(scores) == len(spans) == 3 and d["words_not_scored"] == 2 and d["forward_passes"] == 4


def test_the_report_grid_needs_the_raw_inputs(patch_clf, tmp_path, caplog) -> None:
    """A split whose raw inputs are not at hand, or do not line up with its evaluated rows, gets no grid and a
    log line saying why; one that lines up gets it."""
    import logging

    from duoclass.training.loop import explain_report

    class Split:
        refs = None

    views = np.zeros((1, 3, 3), dtype=np.float32)
    y = np.array([0, 1, 2])
    caplog.set_level(logging.INFO, logger="duoclass")
    explain_report(patch_clf.folder, Split(), views, y, 1.0, tmp_path, torch.device("cpu"), 2, "test")
    assert not (tmp_path / "explanations.png").exists() and "raw inputs are not at hand" in caplog.text
    Split.refs = ["a.png", "b.png"]  # two refs for three evaluated rows
    explain_report(patch_clf.folder, Split(), views, y, 1.0, tmp_path, torch.device("cpu"), 2, "test")
    assert not (tmp_path / "explanations.png").exists()


def test_an_input_encoded_by_the_caller_is_explained_as_its_raw_text(keyword_models) -> None:
    from duoclass.preprocess.load import Encoded

    clf = keyword_models["tfidf-mlp"]
    text = "heavy rain all over the hills"
    e = clf.explain([Encoded(text, clf.preprocessor.load(text))], method="occlusion")[0]
    assert e.ok and e.text == text and e.top_units(1)[0]["text"] == "rain"


def test_auto_falls_back_to_occlusion_without_grad_cam_or_captum(patch_clf, keyword_models, monkeypatch) -> None:
    from duoclass.infer import explain

    monkeypatch.setattr(explain, "installed", lambda module: False)
    assert explain.resolve_method(patch_clf, "auto") == "occlusion"
    assert explain.resolve_method(keyword_models["albert-scratch-tiny"], "auto") == "occlusion"


def test_gradcam_without_the_package_says_what_to_install(patch_clf, patch_data, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import fails as if it were not installed
    paths, _ = patch_test_images(patch_data)
    e = patch_clf.explain(paths[:1], method="gradcam")[0]
    assert "needs the grad-cam package; install it with `pip install duoclass[explain]`, or use --method occlusion" in e.error
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    monkeypatch.setitem(sys.modules, "captum", None)
    e = patch_clf.explain(paths[:1], method="ig")[0]
    assert "--method ig (images) needs captum; install it with `pip install duoclass[explain]`" in e.error


def test_gradcam_on_a_timm_cnn_and_a_clear_refusal_for_a_vision_transformer() -> None:
    """A timm CNN gets Grad-CAM at its last feature stage; a ViT's blocks give tokens, not a map: an explicit
    gradcam is one clear line per input, and auto picks occlusion."""
    from duoclass.explain.gradients import cam_layers, grad_cam
    from duoclass.infer.classifier import Classifier
    from duoclass.infer.explain import resolve_method
    from duoclass.models import create_model
    from duoclass.preprocess.image import ImagePreprocessor

    cnn = create_model("timm:test_resnet", 3, image_size=32).eval()
    assert len(cam_layers(cnn, 32)) == 1
    maps = grad_cam(cnn, torch.rand(2, 3, 32, 32), [0, 2])
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    vit = create_model("timm:test_vit", 3, image_size=160).eval()
    with pytest.raises(DuoclassError, match=r"not image-shaped \(a vision transformer\?\); use --method occlusion"):
        cam_layers(vit, 160)
    with pytest.raises(DuoclassError, match="not image-shaped"):
        grad_cam(vit, torch.rand(1, 3, 160, 160), [0])
    cfg = {"task": "image", "model": {"name": "timm:test_vit"}, "classes": ["a", "b", "c"]}
    clf = Classifier(TorchBackend(vit, "cpu"), ["a", "b", "c"], ImagePreprocessor(160), cfg)
    assert resolve_method(clf, "auto") == "occlusion"
    e = clf.explain([np.zeros((160, 160, 3), dtype=np.uint8)], method="gradcam")[0]
    assert not e.ok and "not image-shaped" in e.error


def test_a_csv_of_texts_gets_a_page_per_row(keyword_models, keyword_data, tmp_path) -> None:
    from duoclass.infer.explain import explain_to_folder

    src = tmp_path / "rows.csv"
    src.write_text("id,text\na1,rain over the hills\na2,\na3,we lost the match\n", encoding="utf-8")
    ex, written = explain_to_folder(keyword_models["tfidf-mlp"], src, tmp_path / "out")
    assert [e.input for e in ex] == ["a1", "a2", "a3"] and all(e.ok for e in ex)
    assert sorted(p.name for p in written) == ["0000-a1.html", "0001-a2.html", "0002-a3.html", "explanations.json"]
    assert ex[2].top_units(1)[0]["text"] == "match" and ex[1].spans == []  # an empty text has nothing to point at


def test_integrated_gradients_refuse_a_bag_of_ngrams_called_directly(keyword_models) -> None:
    """resolve_method refuses first; the function guards its own callers too (a tfidf-mlp has embeddings, but its
    ids are n-grams, not tokens of the text)."""
    from duoclass.explain.gradients import integrated_gradients_text

    clf = keyword_models["tfidf-mlp"]
    with pytest.raises(DuoclassError, match="integrated gradients are for transformer text models"):
        integrated_gradients_text(clf.model, clf.preprocessor, "rain again", 0)
