"""Batch prediction on Ray: the one predict path as a stateful callable for Ray Data's `map_batches`.

    duoclass predict runs/sst2/model test.csv --engine ray --ray-workers 2 --output predictions.csv

    import ray
    from duoclass.ray_predict import predict_dataset
    ds = ray.data.read_csv("texts/")                         # a "text" column (images: "path", or "bytes")
    out = predict_dataset(ds, "runs/sst2/model", workers=8)   # the same rows plus label, score, error, warning
    out.write_csv("predictions/")

Each worker is a Ray actor that loads the model folder once (`Classifier.from_folder`, any backend) and
runs `predict_items` on every batch it is given, so a worker predicts exactly what `duoclass predict`
predicts, and an input that cannot be used gets its own error in its own row, never failing the batch.

`predict_to_csv_ray` (`--engine ray`) writes the very file `duoclass predict` writes, byte for byte: it
reads the inputs the same way, hands Ray blocks that are the batches the local path would form (text
sorted by encoded length, images in input order), puts the results back in input order and writes them
with the same writer. Ray is started locally unless `address` (or RAY_ADDRESS) names a cluster; on a
cluster every node needs duoclass installed and the model folder and image paths at the same place
(a shared file system), or use `predict_dataset` on a dataset with a "bytes" column
(`ray.data.read_binary_files(..., include_paths=True)`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from duoclass.artifacts.folder import backend_variant
from duoclass.errors import DuoclassError
from duoclass.infer.predict import Prediction, batch_order, predict_items, resolve_top_k
from duoclass.infer.csv import csv_inputs, write_predictions_csv

log = logging.getLogger("duoclass")

OUTPUT_COLUMNS = ("label", "score", "top_k", "set", "abstained", "error", "warning")


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DuoclassError("--engine ray needs Ray Data, which is not installed: pip install 'duoclass[ray]' "
                            "(or pip install 'ray[data]')") from None
    return ray


class Predictor:
    """The callable class `map_batches` runs on each worker: loads the model once, predicts every batch.

    A batch is a dict of numpy columns; the input is `column` (texts, image paths or image bytes). The
    batch comes back with label (str, "" on error), score (float, NaN on error), top_k (JSON
    [[label, probability], ...]), error and warning (str, "" for none) added.
    """

    def __init__(self, model_dir: str, column: str, backend: str = "torch", top_k: int = 1, batch_size: int = 64,
                 threads: int | None = None, device: str = "cpu", cwd: str | None = None,
                 abstain_below: float | None = None):
        from duoclass.infer.classifier import Classifier

        if cwd and os.path.isdir(cwd):  # relative image paths mean what they mean to the caller (an actor owns its process)
            os.chdir(cwd)

        if threads and backend == "torch":
            import torch

            torch.set_num_threads(threads)
        self.clf = Classifier.from_folder(model_dir, device=device, backend=backend, threads=threads)
        self.column, self.top_k, self.batch_size = column, top_k, batch_size
        self.rule = self.clf.rule(abstain_below)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [_item(x) for x in batch[self.column]]
        names = [f"row {i}" for i in range(len(items))]
        clf = self.clf
        results = predict_items(clf.preprocessor, clf.backend, clf.classes_, items, self.batch_size, self.top_k,
                                clf.tta, names=names, rule=self.rule)
        out = dict(batch)
        out["label"] = np.array([r.label or "" for r in results], dtype=object)
        out["score"] = np.array([math.nan if r.score is None else r.score for r in results], dtype=np.float64)
        out["top_k"] = np.array([json.dumps(r.top_k) for r in results], dtype=object)
        out["set"] = np.array(["" if r.set is None else json.dumps(r.set) for r in results], dtype=object)
        out["abstained"] = np.array([r.abstained for r in results], dtype=bool)
        out["error"] = np.array([r.error or "" for r in results], dtype=object)
        out["warning"] = np.array([r.warning or "" for r in results], dtype=object)
        return out


def _item(x: Any) -> Any:
    """One input as the predict path takes it: bytes stay bytes; a missing value (None, NaN) is the empty text
    (for a text model, a guess with a warning; for an image model, that row's error)."""
    if isinstance(x, (bytes, bytearray, np.bytes_)):
        return bytes(x)
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x)


def _check_settings(workers: int, cpus_per_worker: float, batch_size: int) -> None:
    if workers < 1:
        raise DuoclassError(f"--workers {workers}: need at least 1 worker")
    if cpus_per_worker <= 0:
        raise DuoclassError(f"cpus_per_worker={cpus_per_worker}: must be positive")
    if batch_size < 1:
        raise DuoclassError(f"--batch-size {batch_size}: must be at least 1")


def predict_dataset(ds: Any, model_dir: str | Path, *, column: str | None = None, workers: int = 2,
                    cpus_per_worker: float = 1, backend: str = "torch", top_k: int = 1, batch_size: int = 64,
                    device: str = "cpu", num_gpus: float = 0, cwd: str | None = None,
                    abstain_below: float | None = None) -> Any:
    """A Ray Dataset: `ds` with label, score, top_k, set (the conformal set as JSON, "" when the model has none),
    abstained (under `abstain_below`), error and warning columns, predicted by `workers` actors
    that each load `model_dir` once. `column` holds the inputs (default: the model's text column for text
    models, "path" for image models; a "bytes" column of encoded images works too). Lazy, like every
    Ray Dataset: nothing runs until it is consumed (write_csv, iter_batches, to_pandas, ...). Relative image
    paths are read from `cwd` on each worker, where that folder exists (default: the workers' own)."""
    from duoclass.artifacts.folder import read_model_config

    _check_settings(workers, cpus_per_worker, batch_size)
    folder = Path(model_dir).resolve()
    cfg = read_model_config(folder)  # a bad folder or backend fails here, with its own message, not in every worker
    backend_variant(folder, cfg, backend)
    return _map(ds, folder, cfg, column, workers, cpus_per_worker, backend, top_k, batch_size, device, num_gpus, cwd,
                abstain_below)


def _map(ds: Any, folder: Path, cfg: dict[str, Any], column: str | None, workers: int, cpus_per_worker: float,
         backend: str, top_k: int, batch_size: int, device: str, num_gpus: float, cwd: str | None,
         abstain_below: float | None = None) -> Any:
    """predict_dataset for a folder whose config (`cfg`) and settings are already checked."""
    if column is None:
        column = cfg["preprocessing"].get("text_column", "text") if cfg["task"] == "text" else "path"
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    if column not in names:
        raise DuoclassError(f"the dataset has no {column!r} column (columns: {', '.join(names) or 'none'}); "
                            "pass column=NAME")
    clash = [c for c in OUTPUT_COLUMNS if c in names and c != column]
    if clash:
        raise DuoclassError(f"the dataset already has column(s) {', '.join(clash)}, which prediction adds; "
                            "rename or drop them first")
    threads = max(1, int(cpus_per_worker))
    ray = _ray()
    return ds.map_batches(Predictor, batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                          num_gpus=num_gpus or None,
                          fn_constructor_kwargs=dict(model_dir=str(folder), column=column, backend=backend, top_k=top_k,
                                                     batch_size=batch_size, threads=threads, device=device, cwd=cwd,
                                                     abstain_below=abstain_below))


@contextmanager
def ray_session(address: str | None = None, cpus: float = 0) -> Iterator[Any]:
    """Ray, initialised: the running instance if there is one, else the cluster at `address` (or RAY_ADDRESS),
    else a new local instance with at least `cpus` CPUs, shut down again on exit."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:  # a local instance: room for every worker, so none waits for a CPU forever
        kw["num_cpus"] = max(os.cpu_count() or 1, math.ceil(cpus))
        # Ray starts its workers at nice 15; here they do all of the job's work while this process waits,
        # so at 15 anything else running on the machine would starve them (40 texts took 138 s instead of 11)
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, **kw)
    except ConnectionError as e:
        raise DuoclassError(f"--ray-address {address}: cannot connect to a Ray cluster there ({e}); "
                            "check the address, or leave it out to start Ray locally") from None
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def predict_to_csv_ray(model_dir: str | Path, input_path: str | Path, output: str | Path | None, *, workers: int = 2,
                       cpus_per_worker: float = 1, top_k: int = 1, batch_size: int = 64, text_column: str | None = None,
                       labels_only: bool = False, backend: str = "torch", device: str = "cpu",
                       address: str | None = None, path_column: str | None = None,
                       abstain_below: float | None = None) -> tuple[int, int]:
    """`duoclass predict --engine ray`: the CSV `predict_to_csv` writes, predicted by Ray workers. (rows, failed)."""
    import pandas as pd

    from duoclass.artifacts.folder import read_model_config
    from duoclass.preprocess.load import preprocessor_from_config

    _check_settings(workers, cpus_per_worker, batch_size)
    folder = Path(model_dir).resolve()
    cfg = read_model_config(folder)
    backend_variant(folder, cfg, backend)
    task, classes = cfg["task"], cfg["classes"]
    from duoclass.calibrate.decide import Rule

    Rule(classes, cfg.get("conformal"), abstain_below).check()  # a bad threshold fails here, not in every worker
    pre = preprocessor_from_config(task, cfg["preprocessing"], folder)
    k = resolve_top_k(top_k, len(classes))  # None: every label
    column = (text_column or pre.text_column) if task == "text" else (path_column or getattr(pre, "path_column", "path"))
    keys, inputs, key = csv_inputs(task, input_path, column)
    order = batch_order(pre, inputs)  # the local path's batches: texts by encoded length, then the unusable ones
    blocks = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    results = [Prediction(kk) for kk in keys]
    if blocks:
        with ray_session(address, workers * cpus_per_worker) as ray:
            ds = ray.data.from_pandas([pd.DataFrame({"row": b, "input": [inputs[i] for i in b]}) for b in blocks])
            out = _map(ds, folder, cfg, "input", min(workers, len(blocks)), cpus_per_worker, backend, k, batch_size,
                       device, 0, os.getcwd(), abstain_below)
            for batch in out.iter_batches(batch_format="numpy", batch_size=None):
                for row, label, score, top, kept, abstained, error, warning in zip(
                        batch["row"], batch["label"], batch["score"], batch["top_k"], batch["set"], batch["abstained"],
                        batch["error"], batch["warning"]):
                    r = results[int(row)]
                    if error:
                        r.error = str(error)
                    else:
                        r.label, r.score = str(label), float(score)
                        r.top_k = [(str(c), float(p)) for c, p in json.loads(top)]
                        r.set = json.loads(kept) if kept else None
                        r.abstained = bool(abstained)
                    r.warning = str(warning) or None
    return write_predictions_csv(results, key, k, labels_only, output, input_path, sets="conformal" in cfg,
                                 abstain=abstain_below is not None)
