"""`duoclass export MODEL_DIR --format onnx`: the model as an ONNX graph, checked against torch on real inputs.

    export_onnx("runs/xray/model")                       # adds variants/onnx/ to the model folder
    export_onnx("runs/xray/model", output="edge/xray")   # a copy of the folder with the variant

The graph comes from torch's current exporter (`torch.onnx.export(..., dynamo=True)`), with a
dynamic batch axis and, for text, a dynamic sequence axis; where that exporter fails the
TorchScript exporter is tried, and the variant's record says which one made the file. Inputs
are the folder's input spec (config.json "inputs"): images as float32 pixels in [0, 1] (the
normalisation is inside the graph), text as token ids (and TF-IDF weights), so the torch-free
preprocessing (preprocess.py) feeds the graph as it feeds torch.

Parity: before anything is written, the ONNX graph and the torch model both run on inputs drawn
from the training data (or `data=`): the largest absolute logit difference and the label
agreement are printed, recorded in config.json (variants.onnx.parity) and in
variants/onnx/parity.json. A graph whose logits differ by more than 1e-3 (relative to the
logits' scale) is refused.

The folder then runs where only onnxruntime, numpy, Pillow and tokenizers are installed:
`duoclass.load(folder, backend="onnx")`, `duoclass predict --backend onnx`.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from duoclass.artifacts.folder import recorded_training
from duoclass.errors import DuoclassError
from duoclass.preprocess.load import load_each

log = logging.getLogger("duoclass")

VARIANT = "onnx"
ONNX_PATH = "variants/onnx/model.onnx"
PARITY_PATH = "variants/onnx/parity.json"
TOLERANCE = 1e-3
MIN_OPSET = 18  # what torch's dynamo exporter writes; onnxruntime 1.17+ runs it


def training_data(cfg: dict[str, Any], data: str | Path | None, folder: Path, flag: str = "--data") -> Path:
    """The dataset to draw real inputs from: `data`, else the one config.json says the model was trained on."""
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise DuoclassError(f"{flag} {data}: not found; pass a dataset of the kind the model was trained on")
        return path
    recorded = recorded_training(cfg)["data"]
    if recorded is not None and Path(recorded).exists():
        return Path(recorded)
    where = f" ({recorded})" if recorded else ""
    raise DuoclassError(f"{folder}: the training data config.json records{where} is not readable from here; "
                        f"pass {flag} DIR, a dataset of the kind the model was trained on")


def sample_inputs(clf: Any, data: Path, n: int, split: str = "train") -> list[Any]:
    """Up to `n` encoded inputs spread evenly over a split (unreadable ones left out)."""
    try:
        inputs = clf.split_inputs(data, split)[0]
    except DuoclassError:
        if split == "train":  # a dataset without a train split: use its test split
            inputs = clf.split_inputs(data, "test")[0]
        else:
            raise
    if not inputs:
        raise DuoclassError(f"{data}: the {split} split has no inputs to check the exported model with")
    idx = np.unique(np.linspace(0, len(inputs) - 1, min(n, len(inputs))).round().astype(int))
    out = list(load_each(clf.preprocessor, inputs, [int(i) for i in idx])[0].values())
    if len(out) < 2:
        raise DuoclassError(f"{data}: fewer than 2 usable inputs in the {split} split; pass --data with more examples")
    return out


def batches(pre: Any, encoded: list[Any], batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Collated batches; text sorted by length (as the predict path batches it)."""
    if pre.task == "text":
        encoded = sorted(encoded, key=len)
    return [pre.collate(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]


def _example(pre: Any, encoded: list[Any]) -> dict[str, np.ndarray]:
    """An example batch for tracing: at least 2 rows and, for text, at least 2 positions (torch.export
    treats a dimension of size 0 or 1 as fixed)."""
    batch = pre.collate(encoded[:4])
    if pre.task == "text":
        for k, v in batch.items():
            if v.shape[1] < 2:
                batch[k] = np.pad(v, ((0, 0), (0, 2 - v.shape[1])))  # padding: id 0, mask 0, weight 0
    return batch


def export_graph(model: Any, names: list[str], example: dict[str, np.ndarray], path: Path, text: bool) -> dict[str, Any]:
    """Write `model` (taking a dict of tensors) as an ONNX file at `path`; return how it was exported."""
    import torch

    class Positional(torch.nn.Module):
        """The dict-taking model as a module of positional tensors, in the folder's input order."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return self.inner(dict(zip(names, xs)))

    wrapper = Positional(model).eval()
    args = tuple(torch.from_numpy(example[n]) for n in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = tuple({0: batch, 1: seq} if text else {0: batch} for _ in names)
    first_error = None
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=(dims,), input_names=names,
                                        output_names=["logits"], optimize=True, verbose=False)
            program.save(str(path), external_data=False)
        return {"exporter": "torch.onnx dynamo", "opset": _opset(path)}
    except Exception as e:  # the exporter raises many kinds; fall back, and say so
        first_error = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        log.warning("the dynamo exporter failed (%s); trying the TorchScript exporter", first_error)
    axes = {n: ({0: "batch", 1: "sequence"} if text else {0: "batch"}) for n in names}
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names, output_names=["logits"],
                              dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=17)
    except Exception as e:
        raise DuoclassError(f"ONNX export failed with both exporters (dynamo: {first_error}; TorchScript: "
                            f"{str(e).strip().splitlines()[0][:300]})") from None
    return {"exporter": "torch.onnx torchscript", "opset": _opset(path), "dynamo_error": first_error}


class _quiet:
    """Silence the exporters' own progress lines on the root logger and stdout."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "torch.fx"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self._redirect.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)


def _opset(path: Path) -> int | None:
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:  # the opset is a record, not a requirement
        return None


def parity(torch_backend: Any, onnx_backend: Any, batches_: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Largest absolute logit difference and label agreement of two backends on the same batches."""
    diffs, agree, n, scale = [], 0, 0, 0.0
    for b in batches_:
        a, o = torch_backend.run(b), onnx_backend.run(b)
        diffs.append(float(np.max(np.abs(a - o))))
        agree += int((a.argmax(1) == o.argmax(1)).sum())
        n += len(a)
        scale = max(scale, float(np.max(np.abs(a))))
    return {"examples": n, "max_abs_logit_diff": max(diffs), "label_agreement": agree / n, "max_abs_logit": scale}


def export_onnx(model_dir: str | Path, output: str | Path | None = None, data: str | Path | None = None,
                examples: int = 256) -> dict[str, Any]:
    """Export a model folder's model to ONNX and check it against torch; the variant is added to the
    folder (or to a copy at `output`). Returns the variant's record."""
    from duoclass.infer.torch_backend import TorchBackend
    from duoclass.artifacts.folder import update_model_folder
    from duoclass.infer.classifier import Classifier
    from duoclass.infer.onnx_backend import OnnxBackend

    folder = Path(model_dir)
    clf = Classifier.from_folder(folder, device="cpu")
    cfg, pre = clf.config_, clf.preprocessor
    names = list(pre.inputs())
    src = training_data(cfg, data, folder)
    encoded = sample_inputs(clf, src, examples)
    model = clf.model.float().eval()
    with tempfile.TemporaryDirectory(prefix="duoclass-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        how = export_graph(model, names, _example(pre, encoded), path, pre.task == "text")
        check = parity(TorchBackend(model, "cpu"), OnnxBackend(path, name="onnx"), batches(pre, encoded))
        check["data"] = str(src)
        limit = TOLERANCE * max(1.0, check["max_abs_logit"])
        log.info("ONNX parity on %d inputs from %s: max |logit difference| %.2e, label agreement %.4f (%s)",
                 check["examples"], src, check["max_abs_logit_diff"], check["label_agreement"], how["exporter"])
        if check["max_abs_logit_diff"] > limit:
            raise DuoclassError(f"{folder}: the ONNX graph's logits differ from torch's by {check['max_abs_logit_diff']:.3g} "
                                f"(limit {limit:.3g}) on {check['examples']} inputs; nothing was written")
        data_bytes = path.read_bytes()
    record = {"path": ONNX_PATH, "format": "onnx", **how, "inputs": names, "parity": check,
              "bytes": len(data_bytes)}
    files = {ONNX_PATH: data_bytes, PARITY_PATH: (json.dumps(check, indent=2) + "\n").encode()}
    target = update_model_folder(folder, files=files, variants={VARIANT: record}, output=output)
    return {**record, "folder": str(target)}
