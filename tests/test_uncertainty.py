"""How good and how sure: AUC and average precision against scikit-learn, bootstrap intervals that cover, a
temperature recovered, conformal sets that hold their coverage, abstentions that never carry a class, and the
gates (refusals) of each, driven to their failing branch."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, f1_score,
                             recall_score, roc_auc_score)

import duoclass
from duoclass.calibrate.conformal import fit_conformal, prediction_sets
from duoclass.calibrate.decide import ABSTAINED, Rule
from duoclass.calibrate.fit import fit_calibration, halves
from duoclass.calibrate.temperature import calibrated, fit_temperature
from duoclass.errors import DuoclassError
from duoclass.report.intervals import bootstrap_intervals, fast_metrics
from duoclass.report.metrics import calibration_metrics, ranking_metrics, risk_coverage
from duoclass.report.metrics import set_coverage as coverage

from .conftest import run_cli


def _probs(rng: np.random.Generator, n: int, c: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(size=(n, c)) * 2
    p = calibrated(z)
    if ties:  # coarse scores: many ties, which AUC and AP must count as scikit-learn does
        p = np.round(p, 1) + 1e-9
        p = p / p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in calibrated(z * 0.7)])
    return p, y


@pytest.mark.parametrize("c,ties", [(2, False), (2, True), (4, False), (4, True)])
def test_auc_and_average_precision_equal_scikit_learns(c: int, ties: bool) -> None:
    rng = np.random.default_rng(c + 10 * ties)
    p, y = _probs(rng, 600, c, ties)
    m = ranking_metrics(y, p, [f"c{i}" for i in range(c)])
    fast = fast_metrics(y, p, c)
    if c == 2:
        want_auc, want_ap = roc_auc_score(y, p[:, 1]), average_precision_score(y, p[:, 1])
        assert m["sensitivity"] == pytest.approx(recall_score(y, p.argmax(1), pos_label=1))
        assert m["specificity"] == pytest.approx(recall_score(y, p.argmax(1), pos_label=0))
        assert fast["sensitivity"] == pytest.approx(m["sensitivity"]) and fast["specificity"] == pytest.approx(m["specificity"])
    else:
        want_auc = roc_auc_score(y, p, multi_class="ovr", average="macro")
        want_ap = np.mean([average_precision_score(y == k, p[:, k]) for k in range(c)])
        assert m["roc_auc_weighted"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="weighted"))
    assert m["roc_auc"] == pytest.approx(want_auc, abs=1e-12) and fast["roc_auc"] == pytest.approx(want_auc, abs=1e-12)
    assert m["average_precision"] == pytest.approx(want_ap, abs=1e-12)
    assert fast["average_precision"] == pytest.approx(want_ap, abs=1e-12)
    assert fast["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert fast["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert fast["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))


@pytest.mark.parametrize("c", [2, 5])
def test_each_resample_equals_scikit_learn_on_the_resampled_examples(c: int) -> None:
    """The intervals' metrics are computed for all resamples at once, from example counts: each must equal
    scikit-learn's on that resample's examples, duplicates and ties included."""
    from duoclass.report.intervals import resampled_metrics, stratified_resamples

    rng = np.random.default_rng(c)
    p, y = _probs(rng, 300, c, ties=True)
    idx = stratified_resamples(y, 12, seed=1)
    got = resampled_metrics(y, p, c, idx)
    for j, row in enumerate(idx):
        yb, pb = y[row], p[row]
        assert got["accuracy"][j] == pytest.approx(accuracy_score(yb, pb.argmax(1)))
        assert got["balanced_accuracy"][j] == pytest.approx(balanced_accuracy_score(yb, pb.argmax(1)))
        assert got["f1_macro"][j] == pytest.approx(f1_score(yb, pb.argmax(1), average="macro"))
        if c == 2:
            assert got["roc_auc"][j] == pytest.approx(roc_auc_score(yb, pb[:, 1]))
            assert got["average_precision"][j] == pytest.approx(average_precision_score(yb, pb[:, 1]))
        else:
            assert got["roc_auc"][j] == pytest.approx(roc_auc_score(yb, pb, multi_class="ovr", average="macro"))
            assert got["average_precision"][j] == pytest.approx(
                np.mean([average_precision_score(yb == k, pb[:, k]) for k in range(c)]))


def test_a_figure_a_split_cannot_give_is_none_not_a_crash() -> None:
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    m = ranking_metrics(np.array([0, 0, 0]), p, ["a", "b"])  # no positive example: AUC is undefined
    assert m["roc_auc"] is None and m["average_precision"] is None and m["sensitivity"] is None
    assert m["specificity"] == pytest.approx(2 / 3)


def test_bootstrap_interval_covers_the_true_accuracy_93_to_97_percent_of_the_time() -> None:
    """400 test sets of 300 drawn from a known model (class 1 prevalence 0.3, per-class accuracy 0.9 and 0.8, so
    the true accuracy is 0.87): the 95% interval must hold 0.87 in 93-97% of them."""
    rng = np.random.default_rng(2024)
    truth, hits = 0.7 * 0.9 + 0.3 * 0.8, 0
    for draw in range(400):
        y = (rng.random(300) < 0.3).astype(np.int64)
        correct = rng.random(300) < np.where(y == 1, 0.8, 0.9)
        pred = np.where(correct, y, 1 - y)
        p = np.where(pred[:, None] == np.arange(2)[None, :], 0.9, 0.1)
        iv = bootstrap_intervals(y, p, 2, resamples=1000, seed=draw, only=("accuracy",))["accuracy"]
        hits += iv["low"] <= truth <= iv["high"]
    assert 0.93 <= hits / 400 <= 0.97, hits / 400


def test_bootstrap_resamples_keep_the_class_mix_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    p, y = _probs(rng, 200, 3)
    a = bootstrap_intervals(y, p, 3, resamples=200, seed=5)
    assert a == bootstrap_intervals(y, p, 3, resamples=200, seed=5)
    assert a != bootstrap_intervals(y, p, 3, resamples=200, seed=6)
    assert a["method"] == {"kind": "stratified percentile bootstrap", "resamples": 200, "seed": 5, "level": 0.95}
    for k in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "average_precision"):
        assert a[k]["low"] < a[k]["high"], k
    from duoclass.report.intervals import stratified_resamples

    idx = stratified_resamples(y, 50, 0)
    assert all(np.array_equal(np.bincount(y[row], minlength=3), np.bincount(y, minlength=3)) for row in idx)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_temperature_fitted_on_data_with_a_known_temperature_recovers_it(true_t: float) -> None:
    rng = np.random.default_rng(int(true_t * 10))
    z = rng.normal(size=(20000, 5)) * 3
    y = np.array([rng.choice(5, p=row) for row in calibrated(z, true_t)])
    t = fit_temperature(z, y)
    assert abs(t - true_t) / true_t < 0.05, t
    assert (calibrated(z, t).argmax(1) == z.argmax(1)).all()  # the order of the classes, so accuracy, is kept


def test_calibration_lowers_ece_and_nll_of_an_over_confident_model() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4000, 4)) * 2
    y = np.array([rng.choice(4, p=row) for row in calibrated(z)])
    over = z * 3  # the same ranking, three times too sure
    cal, cp = fit_calibration(over, y, "temperature")
    assert cp is None and cal["temperature"] == pytest.approx(3.0, rel=0.1)
    assert cal["ece_after"] < cal["ece_before"] / 2 and cal["nll_after"] < cal["nll_before"]
    none, _ = fit_calibration(over, y, "none")
    assert none["temperature"] == 1.0  # --calibration none: the raw softmax


def test_calibration_metrics_by_hand() -> None:
    p = np.array([[0.8, 0.2]] * 10)
    y = np.array([0] * 8 + [1] * 2)  # 80% sure, 80% right: perfectly calibrated
    m = calibration_metrics(y, p)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12) and m["mce"] == pytest.approx(0.0, abs=1e-12)
    assert m["brier"] == pytest.approx((8 * (0.04 + 0.04) + 2 * (0.64 + 0.64)) / 10)
    y2 = np.array([0] * 10)  # 80% sure, always right: ECE 0.2
    assert calibration_metrics(y2, p)["ece"] == pytest.approx(0.2)
    rc = risk_coverage(np.array([0, 1]), np.array([[0.95, 0.05], [0.6, 0.4]]))
    assert rc["curve"][0] == {"abstain_below": 0.5, "coverage": 1.0, "risk": 0.5}
    assert [r for r in rc["curve"] if r["abstain_below"] == 0.9][0] == {"abstain_below": 0.9, "coverage": 0.5, "risk": 0.0}


@pytest.mark.parametrize("score,alpha,c", [("aps", 0.1, 2), ("aps", 0.05, 10), ("raps", 0.1, 10)])
def test_conformal_coverage_holds_on_exchangeable_data(score: str, alpha: float, c: int) -> None:
    """200 draws of 500 calibration and 500 test examples from one distribution (a model that is not
    calibrated: the guarantee must not need it): mean test coverage within 2 points of 1 - alpha."""
    rng = np.random.default_rng(7)
    covs, sizes = [], []
    for _ in range(200):
        z = rng.normal(size=(1000, c)) * 2.5
        y = np.array([rng.choice(c, p=row) for row in calibrated(z, 1.5)])
        p = calibrated(z)  # over-confident
        cp = fit_conformal(p[:500], y[:500], alpha, score)
        r = coverage(prediction_sets(p[500:], cp), y[500:])
        covs.append(r["coverage"])
        sizes.append(r["mean_size"])
    assert abs(np.mean(covs) - (1 - alpha)) < 0.02, np.mean(covs)
    assert np.mean(sizes) < c  # informative: not every class every time


def test_conformal_sets_are_deterministic_and_most_probable_first() -> None:
    rng = np.random.default_rng(3)
    p, y = _probs(rng, 400, 5)
    cp = fit_conformal(p[:200], y[:200], 0.1)
    a, b = prediction_sets(p[200:], cp), prediction_sets(p[200:].copy(), cp)
    assert a == b
    for row, s in zip(p[200:], a):
        assert s == sorted(s, key=lambda k: -row[k])


def test_conformal_refuses_too_few_examples_and_bad_settings() -> None:
    p = calibrated(np.random.default_rng(0).normal(size=(8, 3)))
    y = np.zeros(8, dtype=np.int64)
    with pytest.raises(DuoclassError, match="8 calibration examples are too few for 95% coverage"):
        fit_conformal(p, y, 0.05)
    fit_conformal(np.vstack([p] * 3), np.zeros(24, dtype=np.int64), 0.05)  # 24 are enough for 95%
    with pytest.raises(DuoclassError, match="between 0 and 1"):
        fit_conformal(p, y, 1.0)
    with pytest.raises(DuoclassError, match="unknown; choose one of aps, raps"):
        fit_conformal(p, y, 0.5, "lac")


def test_the_conformal_half_is_disjoint_from_the_temperature_half() -> None:
    y = np.array([0] * 7 + [1] * 5 + [2] * 2)
    a, b = halves(y, 0)
    assert set(a).isdisjoint(b) and sorted([*a, *b]) == list(range(len(y)))
    assert sorted(np.bincount(y[a])) == sorted([4, 3, 1]) and len(b) == 6
    z = np.random.default_rng(0).normal(size=(200, 3))
    yy = np.random.default_rng(1).integers(0, 3, 200)
    cal, cp = fit_calibration(z, yy, conformal=0.2)
    assert cal["n"] + cp["n"] == 200 and "one half" in cal["fitted_on"]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.9"])
def test_abstain_below_refuses_what_is_not_a_probability(bad: object) -> None:
    with pytest.raises(DuoclassError, match="--abstain-below"):
        Rule(["a", "b"], abstain_below=bad).check()  # type: ignore[arg-type]


def test_abstaining_is_refused_when_a_class_is_named_abstained() -> None:
    with pytest.raises(DuoclassError, match="a class named 'abstained'"):
        Rule(["ok", ABSTAINED], abstain_below=0.9).check()
    Rule(["ok", ABSTAINED]).check()  # without abstaining the name is harmless


def test_the_folder_schema_refuses_unusable_calibration_records() -> None:
    from duoclass.artifacts.folder import calibration_problem

    assert calibration_problem({"temperature": 1.3}, "'calibration'") is None
    for bad in ({"temperature": 0}, {"temperature": -1}, {"temperature": float("inf")}, {"temperature": True},
                {"method": "temperature"}, [1.0]):
        assert "positive number" in calibration_problem(bad, "'calibration'"), bad
    from duoclass.artifacts.folder import _calibration_records_problem

    good = {"alpha": 0.1, "score": "aps", "qhat": 0.9, "lambda": 0.0, "k_reg": 0}
    assert _calibration_records_problem({"conformal": good}) is None
    assert "alpha, score, qhat" in _calibration_records_problem({"conformal": {"alpha": 0.1}})
    for key, value in (("alpha", 1.0), ("alpha", 0), ("score", "lac"), ("qhat", "x"), ("lambda", None), ("k_reg", 0.5)):
        assert "unusable value" in _calibration_records_problem({"conformal": {**good, key: value}}), key
    op = {"metric": "sensitivity", "target": 0.95, "threshold": 0.3}
    assert _calibration_records_problem({"classes": ["a", "b"], "operating_point": op}) is None
    assert "is for two classes; this model has 3" in _calibration_records_problem(
        {"classes": ["a", "b", "c"], "operating_point": op})
    for bad in ({**op, "metric": "recall"}, {**op, "threshold": "0.3"}, {**op, "threshold": True}, [0.3]):
        assert "'operating_point' should be" in _calibration_records_problem({"classes": ["a", "b"], "operating_point": bad})
    assert "'variants.onnx-int8.calibration'" in _calibration_records_problem(
        {"variants": {"onnx-int8": {"path": "m.onnx", "format": "onnx", "calibration": {"temperature": -2}}}})


# --- end to end on digits: train, folder, predict, CSV, calibrate ---------------------------------------------
FAST = dict(model="msresnet-tiny", image_size=16, epochs=3, batch_size=64, lr=3e-3, augment="none", progress=False)


@pytest.fixture(scope="module")
def conformal_run(digits: Path, tmp_path_factory) -> duoclass.Classifier:
    return duoclass.train(digits, output=str(tmp_path_factory.mktemp("run")), conformal=0.1, **FAST)


def test_training_records_calibration_intervals_and_conformal_sets(conformal_run: duoclass.Classifier) -> None:
    run = conformal_run.result_.run_dir
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["calibration"]["method"] == "temperature" and cfg["calibration"]["temperature"] > 0
    assert cfg["conformal"]["alpha"] == 0.1 and cfg["conformal"]["score"] == "aps"
    assert cfg["calibration"]["n"] + cfg["conformal"]["n"] == conformal_run.result_.valid["n"]
    test = json.loads((run / "metrics.json").read_text())["test"]
    for k in ("roc_auc", "roc_auc_weighted", "average_precision"):
        assert 0.5 < test[k] <= 1, k
    iv = test["intervals"]
    assert iv["method"]["resamples"] == 1000
    assert iv["accuracy"]["low"] <= test["accuracy"] <= iv["accuracy"]["high"]
    assert test["calibration"]["temperature"] == cfg["calibration"]["temperature"]
    assert set(test["calibration"]["before"]) == {"ece", "mce", "brier", "nll"}
    assert 0.5 < test["conformal"]["coverage"] <= 1 and test["conformal"]["target_coverage"] == 0.9
    for plot in ("reliability.png", "roc_pr.png"):
        assert (run / plot).read_bytes().startswith(b"\x89PNG")


def test_every_prediction_uses_the_recorded_temperature(conformal_run: duoclass.Classifier, digits: Path) -> None:
    import torch

    clf = duoclass.load(conformal_run.result_.model_dir)
    t = clf.temperature
    assert t != 1.0 and t == json.loads((Path(clf.folder) / "config.json").read_text())["calibration"]["temperature"]
    files = sorted((digits / "test").rglob("*.png"))[:40]
    batch = clf.preprocessor.collate([clf.preprocessor.load(f) for f in files])
    with torch.no_grad():
        logits = clf.model({"pixel_values": torch.as_tensor(batch["pixel_values"])}).numpy()
    assert np.allclose(clf.predict_proba(files), calibrated(logits, t), atol=1e-5)
    m = clf.evaluate(digits, split="test", resamples=0)
    assert m["accuracy"] == pytest.approx(conformal_run.result_.test["accuracy"])
    assert m["calibration"]["ece"] == pytest.approx(conformal_run.result_.test["calibration"]["ece"], abs=1e-6)
    assert m["conformal"]["coverage"] == pytest.approx(conformal_run.result_.test["conformal"]["coverage"])


def test_abstained_inputs_never_get_a_class_in_the_api_or_the_csv(conformal_run: duoclass.Classifier, digits: Path,
                                                                  tmp_path: Path) -> None:
    clf = duoclass.load(conformal_run.result_.model_dir)
    files = sorted((digits / "test").rglob("*.png"))[:60]
    scores = clf.predict_proba(files).max(axis=1)
    p = round(float(np.median(scores)), 3)  # about half of them abstain (3 decimals: the CSV prints 6)
    results = clf.predict_results(files, abstain_below=p)
    assert {r.abstained for r in results} == {True, False}
    for r, s in zip(results, scores):
        assert r.abstained == (s < p)
        assert (r.label == ABSTAINED) == r.abstained and r.label in clf.classes_.tolist() + [ABSTAINED]
        assert r.set is not None and all(c in clf.classes_.tolist() for c in r.set)
    below_one = [f for f, s in zip(files, scores) if s < 1.0]  # float32 can round a top probability up to 1.0
    assert len(below_one) > 10
    assert clf.predict(below_one, abstain_below=1.0) == [ABSTAINED] * len(below_one)
    piped = clf(below_one[:3], abstain_below=1.0)
    assert all(d["label"] == ABSTAINED and d["abstained"] is True and "set" in d for d in piped)
    out = tmp_path / "p.csv"
    run_cli(*["predict", str(conformal_run.result_.model_dir), str(digits / "test"), "--output", str(out),
             "--abstain-below", str(p)])
    assert out.is_file()
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:5] == ["path", "label", "probability", "set", "abstained"]
    assert {r["abstained"] for r in rows} == {"true", "false"}
    for r in rows:
        if r["abstained"] == "true":
            assert r["label"] == ABSTAINED and float(r["probability"]) <= p
        else:
            assert r["label"] in clf.classes_.tolist() and float(r["probability"]) >= p
    bad = run_cli(*["predict", str(conformal_run.result_.model_dir), str(digits / "test"), "--abstain-below", "2"]
                  )
    assert bad.returncode != 0 and "--abstain-below 2.0: a probability in (0, 1]" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_calibrate_refits_on_new_data_and_reports_the_previous_temperature(conformal_run: duoclass.Classifier,
                                                                          digits: Path, tmp_path: Path) -> None:
    import shutil

    site = tmp_path / "site"  # labelled data from where the model is used: a folder of class folders, used whole
    shutil.copytree(digits / "test", site)
    out = tmp_path / "recal"
    r = run_cli(*["calibrate", str(conformal_run.result_.model_dir), str(site),
                 "--conformal", "0.2", "--output", str(out), "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    old = conformal_run.temperature
    assert rep["calibration"]["previous_temperature"] == pytest.approx(old)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["conformal"]["alpha"] == 0.2 and cfg["calibration"]["temperature"] == rep["calibration"]["temperature"]
    assert duoclass.load(out).temperature == pytest.approx(rep["calibration"]["temperature"])
    gone = run_cli(*["calibrate", str(conformal_run.result_.model_dir), str(digits), "--split", "nope"])
    assert gone.returncode != 0 and "no 'nope' split" in gone.stderr and "Traceback" not in gone.stderr
    variant = run_cli(*["calibrate", str(conformal_run.result_.model_dir), str(digits), "--backend", "onnx-int8"])
    assert variant.returncode != 0 and "has no onnx-int8 variant" in variant.stderr


def test_the_server_and_the_page_never_give_an_abstained_input_a_class(conformal_run: duoclass.Classifier,
                                                                       digits: Path, tmp_path: Path) -> None:
    """A real server on loopback with --abstain-below, and the page in Chromium: an unsure image gets
    "abstained" (label and field) and no class, a sure one its class; both show their conformal set."""
    import base64

    import httpx

    from .test_serve import Server, chromium

    clf = duoclass.load(conformal_run.result_.model_dir)
    files = sorted((digits / "test").rglob("*.png"))[:64]  # the server's --max-items
    scores = clf.predict_proba(files).max(axis=1)
    p = round(float(np.median(scores)), 4)
    unsure = files[int(np.argmin(scores))]
    sure = files[int(np.argmax(scores))]
    with Server({"digits": conformal_run.result_.model_dir}, abstain_below=p) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        card = c.get("/v1/models/digits").json()
        assert card["abstain_below"] == p and card["conformal"] == {"alpha": 0.1, "score": "aps"}
        assert card["calibration"]["temperature"] == pytest.approx(clf.temperature)
        body = {"images": [base64.b64encode(f.read_bytes()).decode() for f in files]}
        r = c.post("/v1/models/digits/predict", json=body)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert len(got) == len(files)
        for g, score in zip(got, scores):
            assert g["abstained"] == bool(score < p)
            assert (g["label"] == ABSTAINED) == g["abstained"]
            assert g["abstained"] or g["label"] in clf.classes_.tolist()
            assert isinstance(g["set"], list)
        exe = chromium()
        assert exe is not None, "no Chromium: `make test` installs Debian's chromium"
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(s.url + "/")
                page.wait_for_selector("#model-select option", state="attached")
                page.set_input_files("#file-input", str(unsure))
                page.wait_for_selector("#results .result")
                verdict = page.locator("#verdict").inner_text()
                assert verdict.startswith("abstained") and "no label is given" in verdict
                assert not any(f"label: {k}" in verdict for k in clf.classes_.tolist())
                assert page.locator("#prediction-set").inner_text().startswith("conformal set (holds the true class 90%")
                page.screenshot(path=str(tmp_path / "abstained.png"))
                page.set_input_files("#file-input", str(sure))
                page.wait_for_selector("#verdict:has-text('label: ')")
                assert page.locator("#verdict").inner_text() == f"label: {clf.predict([sure])[0]}"
                assert not errors, errors
            finally:
                browser.close()


# --- cross-validation and repeats -------------------------------------------------------------------------------
def test_fold_split_partitions_every_class_evenly() -> None:
    from duoclass.data.splits import fold_split

    labels = ["a"] * 23 + ["b"] * 7 + ["c"] * 5
    parts = [fold_split(labels, 5, k, seed=3) for k in range(5)]
    valids = [set(v) for _, v in parts]
    assert set().union(*valids) == set(range(len(labels))) and sum(map(len, valids)) == len(labels)  # a partition
    for train, valid in parts:
        assert set(train).isdisjoint(valid) and len(train) + len(valid) == len(labels)
        for c, n in (("a", 23), ("b", 7), ("c", 5)):
            assert abs(sum(labels[i] == c for i in valid) - n / 5) <= 1, c  # about 1/K of every class
    assert max(map(len, valids)) - min(map(len, valids)) <= 1
    assert fold_split(labels, 5, 0, 3) == parts[0] and fold_split(labels, 5, 0, 4) != parts[0]


@pytest.mark.parametrize("args,message", [
    (["--folds", "1"], "--folds: got 1; cross-validation needs K >= 2"),
    (["--fold", "2"], "--fold: got 2; a fold is 0..K-1 of --folds K"),
    (["--folds", "3", "--fold", "3"], "--fold: got 3"),
    (["--seeds", "0,x"], "--seeds: got '0,x'; give distinct whole numbers"),
    (["--seeds", "1,1"], "--seeds: got '1,1'"),
    (["--seeds", "0,1", "--folds", "3"], "--seeds: and --folds: choose one"),
])
def test_repeat_settings_are_refused_clearly(args: list[str], message: str, tmp_path: Path) -> None:
    r = run_cli("train", str(tmp_path), *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cross_validation_runs_each_fold_keeps_the_best_valid_and_resumes(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    args = ["train", str(digits), "--output", str(out), "--folds", "2", "--model", "msresnet-tiny", "--image-size", "12",
            "--epochs", "1", "--augment", "none", "--no-progress", "--no-tensorboard", "--bootstrap", "100"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert [x["run"] for x in s["runs"]] == ["fold-0", "fold-1"] and s["kind"] == "cross-validation"
    v0, v1 = (json.loads((out / f"fold-{k}" / "metrics.json").read_text())["valid"]["n"] for k in (0, 1))
    train_n = sum(1 for _ in (digits / "train").rglob("*.png"))
    assert v0 + v1 == train_n  # the two folds' valid parts cover the pooled train (digits has no valid split)
    t0, t1 = (json.loads((out / f"fold-{k}" / "metrics.json").read_text())["test"]["n"] for k in (0, 1))
    assert t0 == t1 == 359  # the test split is untouched
    accs = [x["test"]["accuracy"] for x in s["runs"]]
    assert s["test"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s["test"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    best = max(s["runs"], key=lambda x: x["valid"]["balanced_accuracy"])
    assert s["kept"]["run"] == best["run"] and "best valid balanced_accuracy" in s["kept"]["why"]
    assert "mean ± std" in r.stdout and f"kept: {best['run']}" in r.stdout
    again = run_cli(*args)  # every fold is done: read, not trained again
    assert again.returncode == 0 and "done earlier" in again.stderr and "training into" not in again.stderr


# --- the operating point (two classes) --------------------------------------------------------------------------
def test_the_threshold_reaches_its_target_on_the_data_it_was_chosen_on() -> None:
    from duoclass.calibrate.decide import choose_threshold

    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.4).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    for target in (0.5, 0.8, 0.95, 0.99):
        t = choose_threshold(p, y, "sensitivity", target)
        sens = (p[y == 1] >= t).mean()
        assert sens >= target and (p[y == 1] >= np.nextafter(t, 1)).mean() < target  # the largest such threshold
        t = choose_threshold(p, y, "specificity", target)
        spec = (p[y == 0] < t).mean()
        assert spec >= target and (p[y == 0] < np.nextafter(t, 0)).mean() < target  # the smallest such threshold
    with pytest.raises(DuoclassError, match="examples of both classes"):
        choose_threshold(p[y == 1], y[y == 1], "sensitivity", 0.9)


@pytest.mark.parametrize("bad", ["sensitivity", "sensitivity=1.2", "recall=0.9", "specificity=x", "sensitivity=0"])
def test_operating_point_settings_are_refused_clearly(bad: str, tmp_path: Path) -> None:
    r = run_cli("train", str(tmp_path), "--operating-point", bad)
    assert r.returncode != 0 and f"--operating-point: got {bad!r}; give sensitivity=P or specificity=P" in r.stderr


def test_an_operating_point_on_more_than_two_classes_is_refused(digits: Path, tmp_path: Path) -> None:
    r = run_cli("train", str(digits), "--output", str(tmp_path / "r"), "--operating-point", "sensitivity=0.9",
                "--epochs", "1", "--model", "msresnet-tiny", "--image-size", "8")
    assert r.returncode != 0 and "a decision threshold is for two classes" in r.stderr and "has 10" in r.stderr
    assert not (tmp_path / "r" / "state.pt").exists()  # refused before training


def test_the_operating_point_labels_predict_and_reports_its_figures(digits: Path, tmp_path: Path) -> None:
    import shutil

    two = tmp_path / "two"  # digits 3 against 8: two classes
    for split in ("train", "test"):
        for c in ("3", "8"):
            shutil.copytree(digits / split / c, two / split / c)
    clf = duoclass.train(two, output=str(tmp_path / "run"), operating_point="sensitivity=0.99", **FAST)
    op = json.loads((Path(clf.folder) / "config.json").read_text())["operating_point"]
    assert op["metric"] == "sensitivity" and op["target"] == 0.99 and op["positive"] == "8"
    test = clf.result_.test["operating_point"]
    assert test["threshold"] == op["threshold"] and test["sensitivity_interval"]["low"] <= test["sensitivity"]
    assert clf.result_.valid["operating_point"]["sensitivity"] >= 0.99  # reached where it was chosen
    files = sorted((two / "test").rglob("*.png"))
    p8 = clf.predict_proba(files)[:, 1]
    want = ["8" if p >= op["threshold"] else "3" for p in p8]
    assert clf.predict(files) == want
    assert want != ["8" if p >= 0.5 else "3" for p in p8] or op["threshold"] == pytest.approx(0.5, abs=0.05)
    m = clf.evaluate(two, split="test", resamples=0)
    assert m["operating_point"]["sensitivity"] == pytest.approx(test["sensitivity"])


# --- int8 and pruning refit their own temperature ---------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_text_model(tmp_path_factory) -> Path:
    from .test_text import make_toy

    toy = make_toy(tmp_path_factory.mktemp("cal-toy") / "toy", 120, 40)
    out = tmp_path_factory.mktemp("cal-tfidf")
    duoclass.train(toy, output=str(out), model="tfidf-mlp", epochs=2, batch_size=16, progress=False)
    return out / "model"


def test_quantize_refits_the_int8_temperature_on_valid(toy_text_model: Path, tmp_path: Path) -> None:
    import shutil

    from duoclass.artifacts.folder import read_model_config
    from duoclass.compress.quantize import quantize_model_folder

    folder = tmp_path / "q"
    shutil.copytree(toy_text_model, folder)
    fp32_t = duoclass.load(folder).temperature
    r = quantize_model_folder(folder, method="dynamic", force=True)
    cal = read_model_config(folder)["variants"]["onnx-int8"]["calibration"]
    assert r["calibration"] == cal and cal["n"] == 40 and "(valid)" in cal["fitted_on"]  # the toy's valid split
    assert cal["previous_temperature"] == pytest.approx(fp32_t)
    assert "ece_with_previous_temperature" in cal
    assert duoclass.load(folder, backend="onnx-int8").temperature == pytest.approx(cal["temperature"])
    assert duoclass.load(folder).temperature == pytest.approx(fp32_t)  # the weights keep theirs


def test_without_a_valid_split_the_variant_keeps_the_weights_temperature_and_says_so(
        toy_text_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from duoclass.artifacts.folder import read_model_config
    from duoclass.compress.quantize import quantize_model_folder

    folder = tmp_path / "q"
    shutil.copytree(toy_text_model, folder)
    data = tmp_path / "no-valid"
    src = Path(read_model_config(folder)["training"]["data"])
    data.mkdir()
    for split in ("train", "test"):
        shutil.copy(src / f"{split}.csv", data / f"{split}.csv")
    with caplog.at_level("WARNING", logger="duoclass"):
        r = quantize_model_folder(folder, method="dynamic", force=True, data=data)
    assert r["calibration"] is None
    assert "calibration" not in read_model_config(folder)["variants"]["onnx-int8"]
    assert "keeps the weights' temperature" in caplog.text and "no 'valid' split" in caplog.text
    assert duoclass.load(folder, backend="onnx-int8").temperature == pytest.approx(duoclass.load(folder).temperature)


def test_an_uncalibrated_folder_stays_uncalibrated_after_quantize(tmp_path_factory, tmp_path: Path) -> None:
    from duoclass.artifacts.folder import read_model_config
    from duoclass.compress.quantize import quantize_model_folder

    from .test_text import make_toy

    toy = make_toy(tmp_path / "toy", 60, 20)
    duoclass.train(toy, output=str(tmp_path / "run"), model="tfidf-mlp", epochs=1, batch_size=16, progress=False,
                   calibration="none")
    folder = tmp_path / "run" / "model"
    assert read_model_config(folder)["calibration"]["method"] == "none"
    assert duoclass.load(folder).temperature == 1.0
    r = quantize_model_folder(folder, method="dynamic", force=True)
    assert r["calibration"] is None and duoclass.load(folder, backend="onnx-int8").temperature == 1.0


def test_prune_refits_the_temperature_of_the_pruned_folder(digits: Path, tmp_path: Path) -> None:
    import shutil

    from duoclass.artifacts.folder import read_model_config

    data = tmp_path / "digits-v"  # digits with a valid split of its own
    shutil.copytree(digits / "train", data / "train")
    shutil.copytree(digits / "test", data / "valid")
    shutil.copytree(digits / "test", data / "test")
    src = duoclass.train(data, output=str(tmp_path / "run"), **{**FAST, "epochs": 1, "image_size": 12})
    r = duoclass.prune(src.folder, amount=0.3, output=str(tmp_path / "pruned"))
    cal = read_model_config(tmp_path / "pruned")["calibration"]
    assert r["calibration"] == cal and cal["n"] == 359 and cal["previous_temperature"] == pytest.approx(src.temperature)
    assert duoclass.load(tmp_path / "pruned").temperature == pytest.approx(cal["temperature"])
    assert cal["temperature"] != pytest.approx(src.temperature)  # pruning moved the logits; so did the refit


def test_the_conformal_threshold_is_the_finite_sample_quantile() -> None:
    """qhat is the ceil((n + 1)(1 - alpha))-th smallest calibration score (Angelopoulos and Bates), not its
    neighbour: with 19 examples and alpha 0.1 exactly 18 calibration scores are at or under it."""
    from duoclass.calibrate.conformal import _class_scores, uniforms

    rng = np.random.default_rng(11)
    for n, alpha, want in ((19, 0.1, 18), (99, 0.05, 95), (40, 0.2, 33)):
        p = calibrated(rng.normal(size=(n, 4)) * 2)
        y = rng.integers(0, 4, n)
        cp = fit_conformal(p, y, alpha)
        s = _class_scores(p, uniforms(p), 0.0, 0)[np.arange(n), y]
        assert want == math.ceil((n + 1) * (1 - alpha))
        assert int((s <= cp["qhat"]).sum()) == want and cp["qhat"] == np.sort(s)[want - 1]


def test_the_operating_point_rule_labels_by_the_threshold_not_the_argmax() -> None:
    from duoclass.infer.predict import Prediction

    rule = Rule(["normal", "pneumonia"], operating_point={"metric": "sensitivity", "threshold": 0.2})
    rs = [Prediction("a", probs=np.array([0.7, 0.3])), Prediction("b", probs=np.array([0.9, 0.1])),
          Prediction("c", probs=np.array([0.8, 0.2]))]
    rule.apply_all(rs)
    assert [(r.label, r.score) for r in rs] == [("pneumonia", pytest.approx(0.3)), ("normal", pytest.approx(0.9)),
                                                ("pneumonia", pytest.approx(0.2))]  # at the threshold: positive
    high = Rule(["normal", "pneumonia"], operating_point={"metric": "specificity", "threshold": 0.95}, abstain_below=0.6)
    r = Prediction("d", probs=np.array([0.1, 0.9]))
    high.apply_all([r])
    # thresholded to "normal", whose probability (0.1) is under 0.6: abstained, never a class
    assert r.abstained and r.label == ABSTAINED and r.score == pytest.approx(0.1)


def test_class_conditional_sets_keep_their_coverage_when_the_class_mix_changes() -> None:
    """Calibrated on data with 75% of class 0, tested on data with 40%: marginal sets miss their promise for the
    hard class, so on the new mix they under-cover; class-conditional sets hold 1 - alpha for every class."""
    rng = np.random.default_rng(5)

    def draw(n: int, share0: float) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) > share0).astype(int)
        z = np.stack([np.zeros(n), rng.normal(np.where(y == 1, 0.6, -1.6), 1.5)], axis=1)  # class 1 is the hard one
        return calibrated(z), y

    marginal, by_class = [], []
    for _ in range(100):
        pc, yc = draw(800, 0.75)
        pt, yt = draw(800, 0.4)
        for fit, out in ((fit_conformal(pc, yc, 0.1), marginal), (fit_conformal(pc, yc, 0.1, by_class=True), by_class)):
            sets = prediction_sets(pt, fit)
            out.append([np.mean([c in s for s, t in zip(sets, yt) if t == c]) for c in (0, 1)] +
                       [coverage(sets, yt)["coverage"]])
    m, b = np.mean(marginal, axis=0), np.mean(by_class, axis=0)
    assert m[1] < 0.86 and m[2] < 0.88  # the marginal promise breaks on the new mix
    assert all(abs(v - 0.9) < 0.02 for v in b), b  # per class and overall
    cp = fit_conformal(*draw(200, 0.75), 0.1, by_class=True)
    assert len(cp["qhat_by_class"]) == 2 and cp["qhat"] == max(cp["qhat_by_class"])
    with pytest.raises(DuoclassError, match="of class 1 are too few"):
        p, y = draw(60, 0.97)
        fit_conformal(p, y, 0.05, by_class=True)


def test_a_probability_equal_to_the_abstention_threshold_is_answered() -> None:
    """'Under P' abstains; exactly P is answered (the boundary, as documented)."""
    from duoclass.infer.predict import Prediction

    at, under = Prediction("at", probs=np.array([0.25, 0.75])), Prediction("under", probs=np.array([0.2501, 0.7499]))
    for r in (at, under):
        r.label, r.score = "b", float(r.probs.max())
    Rule(["a", "b"], abstain_below=0.75).apply_all([at, under])
    assert (at.abstained, at.label) == (False, "b") and (under.abstained, under.label) == (True, ABSTAINED)


# --- refusals not driven elsewhere --------------------------------------------------------------------------------
def test_a_head_that_cannot_hold_the_temperature_is_refused_by_the_transformers_export() -> None:
    import torch

    from duoclass.compress.transformers import _bake_temperature

    class Net(torch.nn.Module):
        def __init__(self, head: torch.nn.Module):
            super().__init__()
            self.classifier = head

    plain = Net(torch.nn.Linear(4, 2))
    w, b = plain.classifier.weight.detach().clone(), plain.classifier.bias.detach().clone()
    _bake_temperature(plain, 2.0)
    assert torch.allclose(plain.classifier.weight, w / 2) and torch.allclose(plain.classifier.bias, b / 2)
    _bake_temperature(plain, 1.0)  # nothing to bake
    assert torch.allclose(plain.classifier.weight, w / 2)
    with pytest.raises(DuoclassError, match="no single last linear layer to hold the calibrated temperature"):
        _bake_temperature(Net(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))), 0.5)


def test_class_conditional_sets_need_every_class_in_the_calibration_data() -> None:
    p = calibrated(np.random.default_rng(0).normal(size=(40, 3)))
    with pytest.raises(DuoclassError, match="class 2 has no calibration example"):
        fit_conformal(p, np.array([0, 1] * 20), 0.2, by_class=True)


@pytest.mark.parametrize("args,message", [
    (["--conformal", "1.5"], "--conformal: got 1.5; ALPHA is the miss rate allowed"),
    (["--bootstrap", "-1"], "--bootstrap: got -1; the number of resamples must be >= 0"),
])
def test_calibration_settings_are_refused_clearly(args: list[str], message: str, tmp_path: Path) -> None:
    r = run_cli("train", str(tmp_path), *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_serve_refuses_an_abstention_threshold_that_is_not_a_probability() -> None:
    from duoclass.serve.settings import ServeSettings

    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(DuoclassError, match="--abstain-below: got"):
            ServeSettings(abstain_below=bad)
    assert ServeSettings(abstain_below=1.0).abstain_below == 1.0


def test_only_calibration_records_can_be_set_in_a_folder(conformal_run: duoclass.Classifier, tmp_path: Path) -> None:
    from duoclass.artifacts.folder import update_model_folder

    with pytest.raises(DuoclassError, match="cannot set 'classes' in config.json"):
        update_model_folder(conformal_run.folder, settings={"classes": ["x", "y"]}, output=tmp_path / "c")
    out = update_model_folder(conformal_run.folder, settings={"conformal": None}, output=tmp_path / "c")
    assert duoclass.load(out).conformal is None  # None removes the record: predictions carry no set


def test_calibrate_refuses_too_little_data_and_conformal_sets_on_a_variant(toy_text_model: Path, tmp_path: Path) -> None:
    import shutil

    from duoclass.compress.quantize import quantize_model_folder
    from duoclass.compress.recalibrate import calibrate_model_folder

    folder = tmp_path / "q"
    shutil.copytree(toy_text_model, folder)
    quantize_model_folder(folder, method="dynamic", force=True)
    with pytest.raises(DuoclassError, match="the conformal sets are the folder's"):
        calibrate_model_folder(folder, backend="onnx-int8", conformal=0.2)
    one = tmp_path / "one.csv"
    one.write_text("text,label\na wonderful story,pos\n", encoding="utf-8")
    with pytest.raises(DuoclassError, match="usable examples; calibration needs labelled held-out examples"):
        calibrate_model_folder(folder, one)
