"""ONNX export, the ONNX Runtime backend and int8 quantization, on small real models trained here.

Every model kind duoclass trains is exported and must predict what torch predicts; the exported
folder runs in a fresh virtual environment that has onnxruntime, numpy, Pillow and tokenizers and
no torch; int8 is written only when its own measurements pass, and every refusal is one clear line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

import duoclass
from duoclass.cli import commands as cli
from duoclass.errors import DuoclassError

from .test_text import make_toy

pytestmark = pytest.mark.timeout(600)

FAST = dict(progress=False, tensorboard=False, device="cpu", seed=0, explain_examples=0)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy(tmp_path_factory.mktemp("onnx-text") / "toy", 120, 30)


def train(tmp: pytest.TempPathFactory, name: str, data: Path, **kw) -> Path:
    out = tmp.mktemp(name)
    duoclass.train(data, output=str(out), **kw, **FAST)
    return out / "model"


@pytest.fixture(scope="module")
def image_model(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory, "onnx-msresnet", digits, model="msresnet-tiny", image_size=16, epochs=1, augment="none")


TEXT = {
    "tfidf-mlp": dict(model="tfidf-mlp", epochs=2),
    "fasttext": dict(model="fasttext", epochs=2),
    "fasttext-attention": dict(model="fasttext", epochs=2, pooling="attention"),
    "albert-scratch-tiny": dict(model="albert-scratch-tiny", epochs=1),
    "albert-attention": dict(model="albert-scratch-tiny", epochs=1, pooling="attention"),
}


class TextModels(dict):
    """Model folders of the TEXT kinds, each trained the first time a test asks for it."""

    def __init__(self, toy: Path, tmp: pytest.TempPathFactory):
        super().__init__()
        self.toy, self.tmp = toy, tmp

    def __missing__(self, kind: str) -> Path:
        self[kind] = train(self.tmp, f"onnx-{kind}", self.toy, batch_size=16, **TEXT[kind])
        return self[kind]


@pytest.fixture(scope="module")
def text_models(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return TextModels(toy, tmp_path_factory)


SLOW = pytest.mark.slow  # the other model kinds take the same path; they run with `make test-slow`


def texts(toy: Path) -> list[str]:
    import csv

    with open(toy / "test.csv", newline="", encoding="utf-8") as f:
        rows = [r["text"] for r in csv.DictReader(f)]
    return rows + ["", "zzzz qqqq unseen words only", "a " * 400]  # empty, no known token, longer than max_length


def same_predictions(folder: Path, inputs: list, backend: str = "onnx", atol: float = 1e-4) -> None:
    ref = duoclass.load(folder, device="cpu").predict_results(inputs, top_k=2)
    got = duoclass.load(folder, backend=backend).predict_results(inputs, top_k=2)
    assert [r.label for r in got] == [r.label for r in ref]
    assert [r.error for r in got] == [r.error for r in ref]
    ok = [i for i, r in enumerate(ref) if r.ok]
    assert ok, "nothing was predicted"
    np.testing.assert_allclose(np.stack([got[i].probs for i in ok]), np.stack([ref[i].probs for i in ok]), atol=atol)


# --- export -----------------------------------------------------------------------------------
def test_image_model_exports_and_predicts_as_torch(image_model: Path, digits: Path) -> None:
    from duoclass.compress.onnx import export_onnx

    r = export_onnx(image_model)
    assert r["exporter"] == "torch.onnx dynamo" and r["opset"] >= 18
    p = r["parity"]
    assert p["examples"] >= 2 and p["max_abs_logit_diff"] < 1e-3 and p["label_agreement"] == 1.0
    cfg = json.loads((image_model / "config.json").read_text())
    assert cfg["variants"]["onnx"]["parity"] == p  # stored in the folder, and in its own file
    assert json.loads((image_model / "variants/onnx/parity.json").read_text()) == p
    images = sorted(str(f) for f in (digits / "test").rglob("*.png"))[:40]
    same_predictions(image_model, images + [str(digits / "missing.png")])
    # evaluation through the ONNX backend gives torch's figures
    a = duoclass.load(image_model, device="cpu").evaluate(digits)
    b = duoclass.load(image_model, backend="onnx").evaluate(digits)
    assert a["accuracy"] == b["accuracy"] and a["f1_macro"] == pytest.approx(b["f1_macro"])


@pytest.mark.parametrize("kind", [k if k in ("tfidf-mlp", "albert-scratch-tiny") else pytest.param(k, marks=SLOW)
                                  for k in TEXT])
def test_every_text_model_exports_and_predicts_as_torch(kind: str, text_models: dict[str, Path], toy: Path) -> None:
    from duoclass.compress.onnx import export_onnx

    folder = text_models[kind]
    r = export_onnx(folder)
    assert r["parity"]["label_agreement"] == 1.0
    same_predictions(folder, texts(toy))  # batches of different lengths: the sequence axis is dynamic


def test_export_to_an_output_folder_leaves_the_source_alone(text_models: dict[str, Path], tmp_path: Path) -> None:
    from duoclass.artifacts.folder import read_model_config
    from duoclass.compress.onnx import export_onnx

    src = tmp_path / "src"
    shutil.copytree(text_models["tfidf-mlp"], src)
    before = {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    export_onnx(src, output=tmp_path / "edge")
    assert {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    cfg = read_model_config(tmp_path / "edge")  # a complete, verified model folder
    assert (tmp_path / "edge" / cfg["variants"]["onnx"]["path"]).is_file()
    same_predictions(tmp_path / "edge", ["a b c", "another text"])


def test_cli_export_then_predict_with_each_backend(image_model: Path, digits: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "m"
    shutil.copytree(image_model, folder)
    assert cli.main(["export", str(folder), "--format", "onnx"]) == 0
    assert "label agreement 1.0000" in capsys.readouterr().out
    rows = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.csv"
        assert cli.main(["predict", str(folder), str(digits / "test"), "--backend", backend, "--output", str(out)]) == 0
        rows[backend] = [line.split(",")[:2] for line in out.read_text().splitlines()]
    assert rows["onnx"] == rows["torch"] and len(rows["torch"]) > 10


# --- errors -------------------------------------------------------------------------------------
def test_bad_backend_and_missing_variant_are_one_clear_error(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    duoclass.train(make_toy(tmp_path / "toy2", 40, 10), model="fasttext", epochs=1, output=str(fresh), **FAST)
    with pytest.raises(DuoclassError, match=r"--backend tensorrt: unknown backend; choose one of: torch, onnx, onnx-int8"):
        duoclass.load(fresh / "model", backend="tensorrt")
    with pytest.raises(DuoclassError, match=r"no onnx-int8 variant; make it with `duoclass quantize MODEL_DIR`"):
        duoclass.load(fresh / "model", backend="onnx-int8")
    with pytest.raises(DuoclassError, match=r"no onnx variant; make it with `duoclass export MODEL_DIR --format onnx`"):
        duoclass.load(fresh / "model", backend="onnx")
    r = subprocess.run([sys.executable, "-m", "duoclass", "predict", str(fresh / "model"), "x.csv", "--backend", "onnx"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "duoclass export" in r.stderr


def test_exporting_a_folder_with_a_missing_file_is_refused(text_models: dict[str, Path], tmp_path: Path) -> None:
    from duoclass.compress.onnx import export_onnx

    folder = tmp_path / "broken"
    shutil.copytree(text_models["tfidf-mlp"], folder)
    (folder / "ngrams.json").unlink()
    with pytest.raises(DuoclassError, match=r"ngrams.json: missing from the model folder"):
        export_onnx(folder)


def test_export_without_readable_training_data_asks_for_it(image_model: Path, tmp_path: Path, digits: Path) -> None:
    from duoclass.artifacts.folder import update_model_folder
    from duoclass.compress.onnx import export_onnx

    folder = tmp_path / "moved"
    shutil.copytree(image_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    # the folder as it arrives on another machine: the recorded data path does not exist there
    from duoclass.artifacts import folder as checkpoint

    base = {k: v for k, v in cfg.items() if k not in ("files", "config_sha256")}
    base["training"] = {**cfg.get("training", {}), "data": str(tmp_path / "elsewhere")}
    blobs = {rel: (folder / rel).read_bytes() for rel in cfg["files"]}
    checkpoint._write_folder(folder, base, blobs)
    with pytest.raises(DuoclassError, match=r"training data config.json records .* is not readable from here; pass --data DIR"):
        export_onnx(folder)
    assert export_onnx(folder, data=digits)["parity"]["label_agreement"] == 1.0
    update_model_folder(folder)  # still a valid folder


# --- int8 ---------------------------------------------------------------------------------------
def test_the_format_follows_the_cpu() -> None:
    from duoclass.compress.quantize import plan

    avx2 = plan("dynamic", {"machine": "x86_64", "vnni": False})
    vnni = plan("dynamic", {"machine": "x86_64", "vnni": True})
    arm = plan("dynamic", {"machine": "aarch64", "vnni": False})
    static = plan("static", {"machine": "x86_64", "vnni": False})
    static_vnni = plan("static", {"machine": "x86_64", "vnni": True})
    static_arm = plan("static", {"machine": "aarch64", "vnni": False})
    assert avx2["reduce_range"] and not vnni["reduce_range"] and not arm["reduce_range"]
    assert all(p["quant_format"] == "QDQ" and p["weight_type"] == "int8" for p in (static, static_vnni, static_arm))
    # x86 integer kernels compute u8 x s8: uint8 activations there (7-bit weights without VNNI), S8S8 elsewhere
    assert static["activation_type"] == static_vnni["activation_type"] == "uint8" and static_arm["activation_type"] == "int8"
    assert static["reduce_range"] and not static_vnni["reduce_range"] and not static_arm["reduce_range"]


def test_cpu_features_read_this_machine() -> None:
    from duoclass.infer.onnx_backend import cpu_features

    f = cpu_features()
    if sys.platform.startswith("linux") and f["machine"] == "x86_64":
        flags = Path("/proc/cpuinfo").read_text()
        assert f["known"] and f["avx2"] == (" avx2" in flags) and f["avx512_vnni"] == ("avx512_vnni" in flags)
    assert f["vnni"] == (f["avx512_vnni"] or f["avx_vnni"] or f["amx_int8"])


def test_int8_is_written_only_when_it_passes(text_models: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this CPU measures, the outcome agrees with the measurements: written when int8 is faster
    and within the accuracy budget, else nothing written and the error names the failed test."""
    from duoclass.artifacts.folder import read_model_config
    from duoclass.compress.quantize import quantize_model_folder

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # ONNX Runtime's tools must not leave files in the working folder

    folder = tmp_path / "q"
    shutil.copytree(text_models["albert-scratch-tiny"], folder)
    before = (folder / "config.json").read_bytes()
    try:
        r = quantize_model_folder(folder, method="dynamic", max_accuracy_drop=0.5)
    except DuoclassError as e:
        assert "int8 model not written" in str(e) and ("not faster" in str(e) or "points of accuracy" in str(e))
        assert "onnx-int8" not in read_model_config(folder).get("variants", {})
        assert "--force" in str(e)
    else:
        assert r["speedup"] >= 1.05 and r["accuracy_drop_points"] <= 0.5 and r["passed"] and not r["forced"]
        assert before != (folder / "config.json").read_bytes()
    # --force writes it, says whether it passed, and the folder runs on the int8 backend
    r = quantize_model_folder(folder, method="dynamic", force=True)
    assert r["forced"] == (not r["passed"])
    for key in ("accuracy", "f1_macro", "items_per_s", "latency_ms_p50", "latency_ms_p99"):
        assert key in r["fp32"] and key in r["int8"]
    assert r["settings"]["reduce_range"] == (r["cpu"]["machine"] == "x86_64" and not r["cpu"]["vnni"])
    cfg = read_model_config(folder)
    assert cfg["variants"]["onnx-int8"]["measured"]["forced"] == r["forced"]
    clf = duoclass.load(folder, backend="onnx-int8")
    labels = clf.predict(["a b c", "hello world"])
    assert all(label in clf.classes_ for label in labels)
    assert 0.5 <= r["label_agreement"] <= 1.0
    assert list(cwd.iterdir()) == []


def test_quantizing_twice_is_refused(text_models: dict[str, Path], tmp_path: Path) -> None:
    from duoclass.compress.quantize import quantize_model_folder

    folder = tmp_path / "twice"
    shutil.copytree(text_models["tfidf-mlp"], folder)
    quantize_model_folder(folder, force=True)
    with pytest.raises(DuoclassError, match=r"already holds an int8 model .* Pass --force to rebuild it from the fp32"):
        quantize_model_folder(folder)
    # an fp32 slot that holds an int8 graph is refused too
    cfg = json.loads((folder / "config.json").read_text())
    from duoclass.artifacts import folder as checkpoint

    blobs = {rel: (folder / rel).read_bytes() for rel in cfg["files"]}
    blobs["variants/onnx/model.onnx"] = blobs["variants/onnx-int8/model.onnx"]
    base = {k: v for k, v in cfg.items() if k not in ("files", "config_sha256")}
    base["variants"] = {"onnx": cfg["variants"]["onnx"]}
    del blobs["variants/onnx-int8/model.onnx"], blobs["variants/onnx-int8/report.json"]
    checkpoint._write_folder(folder, base, blobs)
    with pytest.raises(DuoclassError, match=r"this ONNX model is already quantized"):
        quantize_model_folder(folder)


def test_quantize_settings_errors(text_models: dict[str, Path]) -> None:
    from duoclass.compress.quantize import quantize_model_folder

    with pytest.raises(DuoclassError, match=r"--method fp8: unknown; choose one of: dynamic, static"):
        quantize_model_folder(text_models["tfidf-mlp"], method="fp8")
    with pytest.raises(DuoclassError, match=r"--max-accuracy-drop -1"):
        quantize_model_folder(text_models["tfidf-mlp"], max_accuracy_drop=-1)


def test_static_int8_on_an_image_model(image_model: Path, tmp_path: Path) -> None:
    from duoclass.compress.quantize import quantize_model_folder

    folder = tmp_path / "static"
    shutil.copytree(image_model, folder)
    r = quantize_model_folder(folder, force=True, calibration=64)
    assert r["settings"]["method"] == "static" and r["settings"]["quant_format"] == "QDQ"
    assert r["int8_bytes"] < r["fp32_bytes"]
    assert r["examples"] > 0 and 0 <= r["int8"]["accuracy"] <= 1


# --- the safety gates, driven to their failing branch on purpose ---------------------------------
@pytest.fixture(scope="module")
def separating_mlp(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tfidf-mlp trained until it separates the toy task (test accuracy 1.0, class margins far wider than
    int8's error), not at chance, so an int8 model that predicts worse measurably loses accuracy. No ONNX variant."""
    return train(tmp_path_factory, "onnx-gates-mlp", toy, model="tfidf-mlp", epochs=6, batch_size=16)


@pytest.fixture(scope="module")
def separating_mlp_onnx(separating_mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """separating_mlp with its fp32 ONNX variant, ready for `quantize`."""
    from duoclass.compress.onnx import export_onnx

    folder = tmp_path_factory.mktemp("onnx-gates-mlp-onnx") / "model"
    shutil.copytree(separating_mlp, folder)
    export_onnx(folder)
    return folder


def folder_bytes(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def add_to_logits(path: Path, offset: float) -> None:
    """Edit the ONNX file at `path` in place: its logits output becomes the graph's logits + `offset`."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    out = m.graph.output[0].name
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_unedited"
    m.graph.initializer.append(numpy_helper.from_array(np.array(offset, dtype=np.float32), "test_offset"))
    m.graph.node.append(helper.make_node("Add", [out + "_unedited", "test_offset"], [out]))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


REFUSED = r"the ONNX graph's logits differ from torch's by 0\.01 \(limit 0\.001\) on \d+ inputs; nothing was written"


def test_export_refuses_onnx_logits_off_by_1e_2(separating_mlp: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: an ONNX side whose logits differ from torch's by 1e-2 (ten times the 1e-3 tolerance) is refused
    with one clear DuoclassError, and nothing is written to the model folder."""
    from duoclass.compress.onnx import export_onnx
    from duoclass.infer.onnx_backend import OnnxBackend

    folder = tmp_path / "m"
    shutil.copytree(separating_mlp, folder)
    before = folder_bytes(folder)
    real = OnnxBackend.run
    monkeypatch.setattr(OnnxBackend, "run", lambda self, inputs: real(self, inputs) + np.float32(1e-2))
    with pytest.raises(DuoclassError, match=REFUSED):
        export_onnx(folder)
    assert folder_bytes(folder) == before and not (folder / "variants").exists()


def test_export_refuses_an_edited_graph(separating_mlp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: parity runs the exported ONNX file itself against torch: a graph edited after export to add 1e-2
    to its logits is refused, nothing written (a parity that compared torch with torch would pass it)."""
    from duoclass.compress import onnx as export

    real = export.export_graph

    def edited(model, names, example, path, text):
        how = real(model, names, example, path, text)
        add_to_logits(path, 1e-2)
        return how

    monkeypatch.setattr(export, "export_graph", edited)
    folder = tmp_path / "m"
    shutil.copytree(separating_mlp, folder)
    before = folder_bytes(folder)
    with pytest.raises(DuoclassError, match=REFUSED):
        export.export_onnx(folder)
    assert folder_bytes(folder) == before and not (folder / "variants").exists()


def test_recorded_parity_is_the_onnx_graphs_own_difference(separating_mlp: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: the parity recorded in config.json and parity.json is the ONNX graph against torch: on the very
    batches it checked, ONNX Runtime running the written model.onnx and the torch model differ by exactly the
    recorded max |logit difference|, which is above 0 (torch against itself would record 0)."""
    import onnxruntime as ort

    from duoclass.compress import onnx as export

    seen: list[list[dict[str, np.ndarray]]] = []
    real = export.parity
    monkeypatch.setattr(export, "parity", lambda t, o, b: (seen.append(b), real(t, o, b))[1])
    folder = tmp_path / "m"
    shutil.copytree(separating_mlp, folder)
    p = export.export_onnx(folder)["parity"]
    assert len(seen) == 1 and p["examples"] == sum(len(next(iter(b.values()))) for b in seen[0])
    assert json.loads((folder / "variants/onnx/parity.json").read_text()) == p
    assert json.loads((folder / "config.json").read_text())["variants"]["onnx"]["parity"] == p
    session = ort.InferenceSession(str(folder / "variants/onnx/model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    torch_model = duoclass.load(folder, device="cpu").backend
    diff, agree, scale = 0.0, 0, 0.0
    for b in seen[0]:
        a = torch_model.run(b)
        o = session.run(None, {k: b[k] for k in names})[0]
        diff = max(diff, float(np.max(np.abs(a - o))))
        agree += int((a.argmax(1) == o.argmax(1)).sum())
        scale = max(scale, float(np.max(np.abs(a))))
    assert diff > 0, "ONNX Runtime and torch agree to the last bit here; this test cannot tell them apart"
    assert p["max_abs_logit_diff"] == pytest.approx(diff, rel=1e-3) and p["max_abs_logit_diff"] > 0
    assert p["label_agreement"] == agree / p["examples"] == 1.0
    assert p["max_abs_logit"] == pytest.approx(scale, rel=1e-6)


def force_speedup(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """Make quantize's timing report int8 at `factor` times fp32's measured throughput."""
    from duoclass.compress import quantize

    real = quantize.measure_speed

    def measured(backends, *args, **kw):
        out = real(backends, *args, **kw)
        out["int8"]["items_per_s"] = out["fp32"]["items_per_s"] * factor
        return out

    monkeypatch.setattr(quantize, "measure_speed", measured)


def force_worse_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the int8 model predict worse: the first row of each batch it runs gets its two logits swapped."""
    from duoclass.infer.onnx_backend import OnnxBackend

    real = OnnxBackend.run

    def run(self, inputs):
        logits = real(self, inputs)
        if self.name == "onnx-int8":
            logits = logits.copy()
            logits[0] = logits[0, ::-1]
        return logits

    monkeypatch.setattr(OnnxBackend, "run", run)


def test_int8_measured_slower_is_refused(separating_mlp_onnx: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: an int8 model measured slower than fp32 (0.5x) is not written: the folder is unchanged and the
    error names the speed test (and not the accuracy test, which it passes)."""
    from duoclass.compress.quantize import quantize_model_folder

    folder = tmp_path / "m"
    shutil.copytree(separating_mlp_onnx, folder)
    before = folder_bytes(folder)
    force_speedup(monkeypatch, 0.5)
    with pytest.raises(DuoclassError, match=r"int8 model not written: int8 is not faster on this CPU \(.* items/s at "
                                            r"batch 32, 0\.50x; it must reach 1\.05x\)\. Pass --force") as e:
        quantize_model_folder(folder, method="dynamic", max_accuracy_drop=0.5)
    assert "accuracy" not in str(e.value)
    assert folder_bytes(folder) == before and not (folder / "variants/onnx-int8").exists()


def test_int8_measured_worse_is_refused(separating_mlp_onnx: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: an int8 model that loses more than --max-accuracy-drop points of accuracy is not written, even
    when it is faster: the folder is unchanged and the error names the accuracy test (and not the speed test)."""
    from duoclass.compress.quantize import quantize_model_folder

    folder = tmp_path / "m"
    shutil.copytree(separating_mlp_onnx, folder)
    before = folder_bytes(folder)
    force_speedup(monkeypatch, 2.0)
    force_worse_int8(monkeypatch)
    with pytest.raises(DuoclassError, match=r"int8 model not written: int8 loses \d+\.\d\d points of accuracy "
                                            r"\(1\.0000 -> 0\.9\d+\), more than --max-accuracy-drop 0\.5\. Pass --force") as e:
        quantize_model_folder(folder, method="dynamic", max_accuracy_drop=0.5)
    assert "not faster" not in str(e.value)
    assert folder_bytes(folder) == before and not (folder / "variants/onnx-int8").exists()


def test_int8_faster_and_no_worse_is_written(separating_mlp_onnx: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: an int8 model measured faster (2x) and no less accurate is written to variants/onnx-int8 and
    recorded as passed, not forced; the folder then runs on the int8 backend."""
    from duoclass.artifacts.folder import read_model_config
    from duoclass.compress.quantize import INT8_PATH, REPORT_PATH, is_quantized, quantize_model_folder

    folder = tmp_path / "m"
    shutil.copytree(separating_mlp_onnx, folder)
    force_speedup(monkeypatch, 2.0)
    r = quantize_model_folder(folder, method="dynamic", max_accuracy_drop=0.5)
    assert r["passed"] and not r["forced"] and r["speedup"] == pytest.approx(2.0)
    assert r["fp32"]["accuracy"] == r["int8"]["accuracy"] == 1.0 and r["accuracy_drop_points"] == 0
    rec = read_model_config(folder)["variants"]["onnx-int8"]
    assert rec["path"] == INT8_PATH and rec["measured"]["passed"] and not rec["measured"]["forced"]
    assert is_quantized(folder / INT8_PATH)
    report = json.loads((folder / REPORT_PATH).read_text())
    assert report["passed"] and not report["forced"] and report["speedup"] == pytest.approx(2.0)
    assert duoclass.load(folder, backend="onnx-int8").predict(["a good film", "an awful plot"]) == ["pos", "neg"]


def test_forced_int8_is_written_and_recorded_as_forced(separating_mlp_onnx: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: --force writes an int8 model that failed its tests (here measured slower and worse), and records
    in config.json and report.json that it did not pass and was forced."""
    from duoclass.artifacts.folder import read_model_config
    from duoclass.compress.quantize import INT8_PATH, REPORT_PATH, quantize_model_folder

    folder = tmp_path / "m"
    shutil.copytree(separating_mlp_onnx, folder)
    force_speedup(monkeypatch, 0.5)
    force_worse_int8(monkeypatch)
    r = quantize_model_folder(folder, method="dynamic", max_accuracy_drop=0.5, force=True)
    assert r["forced"] and not r["passed"] and r["speedup"] == pytest.approx(0.5) and r["accuracy_drop_points"] > 0.5
    rec = read_model_config(folder)["variants"]["onnx-int8"]
    assert rec["measured"]["forced"] and not rec["measured"]["passed"] and (folder / INT8_PATH).is_file()
    report = json.loads((folder / REPORT_PATH).read_text())
    assert report["forced"] and not report["passed"]


# --- a machine without torch ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only onnxruntime, numpy, Pillow and tokenizers, and duoclass's source."""
    root = tmp_path_factory.mktemp("torch-free") / "venv"
    venv.EnvBuilder(with_pip=True).create(root)
    py = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "onnxruntime", "numpy", "Pillow", "tokenizers"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot install onnxruntime, numpy, Pillow and tokenizers from the package index: {r.stderr[-300:]}")
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "duoclass-source.pth").write_text(str(ROOT / "src") + "\n")  # duoclass without its training extras
    return py


NO_TORCH = """
import json, sys
for name in ("torch", "transformers", "onnx", "matplotlib"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        sys.exit(f"{name} is installed here; this environment should not have it")
import duoclass
"""

SCRIPT = NO_TORCH + """
folder, backend, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
res = duoclass.load(folder, backend=backend).predict_results(inputs)
print(json.dumps([[r.label, None if r.probs is None else r.probs.tolist(), r.error] for r in res]))
"""


@pytest.mark.parametrize("kind", ["image", "albert-scratch-tiny", pytest.param("tfidf-mlp", marks=SLOW)])
def test_the_exported_folder_runs_without_torch(kind: str, torch_free_python: Path, image_model: Path,
                                                text_models: dict[str, Path], digits: Path, toy: Path) -> None:
    from duoclass.compress.onnx import export_onnx

    folder = image_model if kind == "image" else text_models[kind]
    from duoclass.artifacts.folder import read_model_config

    if "onnx" not in read_model_config(folder).get("variants", {}):
        export_onnx(folder)
    inputs = (sorted(str(f) for f in (digits / "test").rglob("*.png"))[:20] if kind == "image" else texts(toy))
    r = subprocess.run([str(torch_free_python), "-c", SCRIPT, str(folder), "onnx", json.dumps(inputs)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ref = duoclass.load(folder, device="cpu").predict_results(inputs)
    assert [g[0] for g in got] == [x.label for x in ref]
    assert [g[2] for g in got] == [x.error for x in ref]
    for g, x in zip(got, ref):
        if x.ok:
            np.testing.assert_allclose(g[1], x.probs, atol=1e-4)


EXPLAIN_SCRIPT = NO_TORCH + """
folder, backend, inputs, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
ex = duoclass.load(folder, backend=backend).explain(inputs)  # auto: occlusion, the one method without gradients
ex.save(out)
print(json.dumps([[e.method, e.label, None if e.attributions is None else e.attributions.tolist(), e.error] for e in ex]))
"""


@pytest.mark.parametrize("kind", ["image", "albert-scratch-tiny"])
def test_explain_runs_without_torch_on_onnx_and_int8(kind: str, torch_free_python: Path, image_model: Path,
                                                      text_models: dict[str, Path], digits: Path, toy: Path,
                                                      tmp_path: Path) -> None:
    """Occlusion explains the onnx and onnx-int8 variants in a process that cannot import torch, and the fp32 ONNX
    explanation is torch's; an unreadable input keeps its own error."""
    from duoclass.compress.onnx import export_onnx
    from duoclass.compress.quantize import quantize_model_folder

    folder = tmp_path / "model"
    shutil.copytree(image_model if kind == "image" else text_models[kind], folder)
    export_onnx(folder)
    quantize_model_folder(folder, force=True, calibration=32)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    inputs = (sorted(str(f) for f in (digits / "test").rglob("*.png"))[:3] + [str(broken)] if kind == "image"
              else texts(toy)[:3])
    ref = duoclass.load(folder, device="cpu").explain(inputs, method="occlusion")
    for backend in ("onnx", "onnx-int8"):
        out = tmp_path / backend
        r = subprocess.run([str(torch_free_python), "-c", EXPLAIN_SCRIPT, str(folder), backend, json.dumps(inputs),
                            str(out)], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert [g[0] for g in got] == ["occlusion"] * len(inputs)
        assert [g[3] is None for g in got] == [e.ok for e in ref]
        assert (out / "explanations.json").is_file()
        assert len(list(out.glob("*.png" if kind == "image" else "*.html"))) == sum(e.ok for e in ref)
        for g, e in zip(got, ref):
            if e.ok:
                a = np.asarray(g[2])
                assert a.shape == e.attributions.shape and np.all(np.isfinite(a))
                if backend == "onnx":
                    np.testing.assert_allclose(a, e.attributions, atol=2e-3)
