"""`duoclass quantize MODEL_DIR`: int8 with ONNX Runtime, kept only when it is faster and no worse.

    quantize_model_folder("runs/sst2/model")                    # dynamic int8 for a text model
    quantize_model_folder("runs/xray/model", method="static")  # static QDQ int8, calibrated on training images

Methods (ONNX Runtime's quantization tool, onnxruntime.quantization):
  dynamic  weights int8 ahead of time, activations quantized on the fly per batch: the choice for
           transformer linears and embedding tables (the default for text models).
  static   weights and activations int8, activation ranges calibrated (MinMax) on a sample of the
           training data, in the QDQ format with per-channel weights: the choice for CNNs (the
           default for image models).

The format follows the CPU found here (onnx_backend.cpu_features):
  - x86-64: uint8 activations and int8 weights (U8S8), the pair ONNX Runtime's x86 integer kernels
    compute natively. (S8S8 QDQ, ONNX Runtime's general first suggestion, ran msresnet at 0.7x the fp32
    speed on an AVX-512 VNNI CPU, against 2.4x for U8S8 QDQ: benchmarks/RESULTS.md.)
  - Arm and other CPUs: static S8S8 QDQ; dynamic U8S8.
  - x86-64 without VNNI (AVX2, AVX-512 without VNNI): the u8 x s8 kernels add pairs of products in
    16 bits (VPMADDUBSW), which can saturate; the weights are quantized to 7 bits (reduce_range) so
    they cannot. With AVX-512 VNNI, AVX-VNNI or AMX the full 8 bits are used.

Proof: before writing, the fp32 ONNX model and the int8 model are both measured on this CPU, on the
test split of the data the model was trained on (or `data=`): accuracy and macro F1, label
agreement, throughput at `batch_size` and batch-1 latency (p50, p99), interleaved so both see the
same load. The int8 model is written (variants/onnx-int8/) only when it is faster (at least MIN_SPEEDUP,
1.05x: smaller gains are within run-to-run noise) and loses at most
`max_accuracy_drop` points of accuracy; otherwise nothing is written and the error says which test
failed, unless `force`. The measurements go into config.json (variants.onnx-int8) and
variants/onnx-int8/report.json.
"""
from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from duoclass.errors import DuoclassError
from duoclass.preprocess.load import load_each

log = logging.getLogger("duoclass")

VARIANT = "onnx-int8"
INT8_PATH = "variants/onnx-int8/model.onnx"
REPORT_PATH = "variants/onnx-int8/report.json"
METHODS = ("dynamic", "static")
MIN_SPEEDUP = 1.05  # "faster" means at least 5% more throughput: smaller gains are within run-to-run noise
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm", "QAttention"}


def plan(method: str, cpu: dict[str, Any]) -> dict[str, Any]:
    """The quantization settings for `method` on a CPU with these features (see the module docstring)."""
    x86 = cpu.get("machine") in ("x86_64", "amd64", "i686", "x86")
    reduce = bool(x86 and not cpu.get("vnni"))
    why = ("x86-64 without VNNI: 7-bit weights (reduce_range) so u8 x s8 sums cannot saturate" if reduce
           else "VNNI/AMX (or not x86): full 8-bit weights")
    if method == "static":
        if x86:
            return {"method": "static", "quant_format": "QDQ", "activation_type": "uint8", "weight_type": "int8",
                    "per_channel": True, "reduce_range": reduce, "calibration": "MinMax",
                    "why": "x86-64: U8S8 QDQ, what the x86 integer kernels compute natively; " + why}
        return {"method": "static", "quant_format": "QDQ", "activation_type": "int8", "weight_type": "int8",
                "per_channel": True, "reduce_range": False, "calibration": "MinMax",
                "why": "S8S8 QDQ: ONNX Runtime's recommended static format off x86"}
    return {"method": "dynamic", "quant_format": "QOperator", "activation_type": "uint8 (dynamic)", "weight_type": "int8",
            "per_channel": True, "reduce_range": reduce, "why": why}


def is_quantized(path: Path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in QUANTIZED_OPS for n in m.graph.node)


def quantize_file(src: Path, dst: Path, settings: dict[str, Any], calibration: list[dict[str, np.ndarray]] | None) -> None:
    """Quantize the ONNX file `src` into `dst` with `plan()`'s settings."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="duoclass-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:  # ONNX shape inference and graph clean-up, as ONNX Runtime recommends before quantizing (its symbolic
            # shape inference is skipped: it fails on the dynamo export of some encoders and leaves files in the cwd)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # some graphs defeat symbolic shape inference; quantize the graph as it is
            log.info("quantization pre-processing skipped (%s)", str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            pre = src
        if settings["method"] == "dynamic":
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, reduce_range=settings["reduce_range"],
                             per_channel=settings["per_channel"])
            return
        import onnxruntime as ort

        names = [i.name for i in ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()]

        class Reader(CalibrationDataReader):
            """The calibration batches, fed with the graph's own input names."""

            def __init__(self) -> None:
                self.batches = iter([{k: b[k] for k in names} for b in calibration or []])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        activations = QuantType.QUInt8 if settings["activation_type"] == "uint8" else QuantType.QInt8
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=settings["per_channel"],
                        activation_type=activations, weight_type=QuantType.QInt8, reduce_range=settings["reduce_range"])


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_speed(backends: dict[str, Any], pre: Any, encoded: list[Any], batch_size: int, latency_items: int = 200,
                  repeats: int = 3) -> dict[str, dict[str, float]]:
    """Throughput (items/s, median of `repeats` passes over `encoded` in batches) and batch-1 latency
    (p50, p99 in ms) of each backend's model run, interleaved so all see the same machine load."""
    from duoclass.compress.onnx import batches

    full = batches(pre, encoded, batch_size)
    singles = [pre.collate([e]) for e in encoded[:latency_items]]
    n = sum(len(next(iter(b.values()))) for b in full)
    for b in backends.values():  # warm up: first runs allocate and pick kernels
        b.run(full[0])
        b.run(singles[0])
    passes: dict[str, list[float]] = {k: [] for k in backends}
    lat: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(repeats):
        for k, b in backends.items():
            passes[k].append(_timed(lambda b=b: [b.run(x) for x in full]))
    for x in singles:
        for k, b in backends.items():
            lat[k].append(_timed(lambda b=b, x=x: b.run(x)) * 1000)
    return {k: {"items_per_s": n / statistics.median(passes[k]), "batch": batch_size, "items": n,
                "latency_ms_p50": float(np.percentile(lat[k], 50)), "latency_ms_p99": float(np.percentile(lat[k], 99)),
                "latency_items": len(lat[k])} for k in backends}


def _scores(clf: Any, inputs: list[Any], names: list[str], labels: list[int], batch_size: int) -> tuple[dict[str, Any], list[Any]]:
    from duoclass.infer.predict import evaluate_results, predict_items

    res = predict_items(clf.preprocessor, clf.backend, clf.classes_, inputs, batch_size, 1, clf.tta, names=names)
    m = evaluate_results(res, labels, clf.classes_, 1, "test split")
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}, [r.label for r in res]


# Long on purpose: the steps a user reads in its report, in order (plan, quantize, measure both on the same
# inputs, gate on speed and accuracy, write or refuse); each measurement is a function of its own.
def quantize_model_folder(model_dir: str | Path, method: str | None = None, output: str | Path | None = None,
                          data: str | Path | None = None, split: str = "test", max_accuracy_drop: float = 0.5,
                          force: bool = False, calibration: int = 256, batch_size: int = 32,
                          threads: int | None = None) -> dict[str, Any]:
    """Quantize a model folder's ONNX variant to int8, measure it against fp32, and keep it only if it earns its
    place (see the module docstring). Exports to ONNX first when the folder has no ONNX variant."""
    from duoclass.artifacts.folder import read_model_config, update_model_folder
    from duoclass.infer.classifier import Classifier
    from duoclass.compress.onnx import sample_inputs, training_data
    from duoclass.infer.onnx_backend import OnnxBackend, cpu_features

    folder = Path(model_dir)
    if method is not None and method not in METHODS:
        raise DuoclassError(f"--method {method}: unknown; choose one of: {', '.join(METHODS)}")
    if not 0 <= max_accuracy_drop <= 100:
        raise DuoclassError(f"--max-accuracy-drop {max_accuracy_drop}: give accuracy points between 0 and 100 (e.g. 0.5)")
    cfg = read_model_config(folder)
    if VARIANT in cfg.get("variants", {}) and not force:
        raise DuoclassError(f"{folder}: already holds an int8 model ({cfg['variants'][VARIANT]['path']}); quantizing "
                            "int8 again would only add error. Pass --force to rebuild it from the fp32 ONNX model")
    if "onnx" not in cfg.get("variants", {}):
        from duoclass.compress.onnx import export_onnx

        log.info("%s has no ONNX variant: exporting it first", folder)
        export_onnx(folder, data=data)
        cfg = read_model_config(folder)
    src = folder / cfg["variants"]["onnx"]["path"]
    if is_quantized(src):
        raise DuoclassError(f"{src}: this ONNX model is already quantized; quantize the fp32 export "
                            "(`duoclass export MODEL_DIR --format onnx`) instead")
    method = method or ("static" if cfg["task"] == "image" else "dynamic")
    cpu = cpu_features()
    settings = plan(method, cpu)
    fp32 = Classifier.from_folder(folder, backend="onnx", threads=threads)
    src_data = training_data(cfg, data, folder)
    calib = None
    if method == "static":
        from duoclass.compress.onnx import batches

        calib = batches(fp32.preprocessor, sample_inputs(fp32, src_data, calibration), batch_size)
    inputs, names, labels, _, split = fp32.split_inputs(src_data, split)
    if not inputs:
        raise DuoclassError(f"{src_data}: the {split} split is empty; pass --split NAME or --data DIR with labelled examples")
    with tempfile.TemporaryDirectory(prefix="duoclass-int8-") as tmp:
        dst = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        quantize_file(src, dst, settings, calib)
        settings["seconds"] = round(time.perf_counter() - t0, 2)
        int8 = Classifier(OnnxBackend(dst, threads=threads, name=VARIANT), fp32.classes_, fp32.preprocessor, fp32.config_)
        before, labels_fp32 = _scores(fp32, inputs, names, labels, batch_size)
        after, labels_int8 = _scores(int8, inputs, names, labels, batch_size)
        agree = sum(a == b for a, b in zip(labels_fp32, labels_int8) if a is not None) / max(1, sum(a is not None for a in labels_fp32))
        encoded = list(load_each(fp32.preprocessor, inputs)[0].values())
        speed = measure_speed({"fp32": fp32.backend, "int8": int8.backend}, fp32.preprocessor, encoded, batch_size)
        int8_bytes = dst.read_bytes()
    drop = (before["accuracy"] - after["accuracy"]) * 100
    ratio = speed["int8"]["items_per_s"] / speed["fp32"]["items_per_s"]
    report = {"split": split, "data": str(src_data), "examples": len(inputs), "cpu": cpu, "threads": fp32.backend.threads,
              "settings": settings, "fp32": {**before, **speed["fp32"]}, "int8": {**after, **speed["int8"]},
              "label_agreement": agree, "accuracy_drop_points": drop, "speedup": ratio,
              "max_accuracy_drop": max_accuracy_drop, "fp32_bytes": src.stat().st_size, "int8_bytes": len(int8_bytes)}
    problems = []
    if ratio < MIN_SPEEDUP:
        problems.append(f"int8 is not faster on this CPU ({speed['int8']['items_per_s']:.1f} against "
                        f"{speed['fp32']['items_per_s']:.1f} items/s at batch {batch_size}, {ratio:.2f}x; "
                        f"it must reach {MIN_SPEEDUP:.2f}x)")
    if drop > max_accuracy_drop:
        problems.append(f"int8 loses {drop:.2f} points of accuracy ({before['accuracy']:.4f} -> {after['accuracy']:.4f}), "
                        f"more than --max-accuracy-drop {max_accuracy_drop}")
    report["passed"] = not problems
    report["forced"] = bool(problems and force)
    log.debug("int8 (%s): accuracy %.4f -> %.4f, agreement %.4f, %.2fx throughput, p50 %.2f -> %.2f ms",
             method, before["accuracy"], after["accuracy"], agree, ratio, speed["fp32"]["latency_ms_p50"],
             speed["int8"]["latency_ms_p50"])
    if problems and not force:
        raise DuoclassError(f"{folder}: int8 model not written: {'; and '.join(problems)}. Pass --force to write it anyway")
    record = {"path": INT8_PATH, "format": "onnx", "quantization": settings, "source": cfg["variants"]["onnx"]["path"],
              "measured": {k: report[k] for k in ("split", "examples", "label_agreement", "accuracy_drop_points", "speedup",
                                                  "passed", "forced")},
              "bytes": len(int8_bytes)}
    files = {INT8_PATH: int8_bytes, REPORT_PATH: (json.dumps(report, indent=2) + "\n").encode()}
    target = update_model_folder(folder, files=files, variants={VARIANT: record}, output=output)
    from duoclass.compress.recalibrate import refit_variant

    report["calibration"] = refit_variant(Path(target), VARIANT, src_data)  # int8 changes the logits: its own temperature
    return {**report, "folder": str(target)}
