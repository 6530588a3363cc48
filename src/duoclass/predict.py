"""The one predict path: raw inputs in, one result per input out, each a prediction or its own error.

    results = predict_items(preprocessor, backend, classes, ["a.png", "broken.png", b"..."], top_k=3)
    results[0].label, results[0].score, results[0].top_k     # "pneumonia", 0.93, [("pneumonia", 0.93), ...]
    results[1].error                                         # "broken.png: truncated image ..."

`Classifier.predict`, `predict_proba`, `__call__` and `evaluate`, the engine's validation,
the CSV writer below and a server all go through `predict_probs` (the only code that runs a
model for prediction) and, for raw inputs, `predict_items`. One unusable input fails only its
own result, never its batch. Nothing here imports torch: a backend (backends.py) runs the model.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .data.sources import IMAGE_EXTS, ZIP_SEP, display
from .errors import DuoclassError

log = logging.getLogger("duoclass")


@dataclass
class Prediction:
    """The result for one input: a label with its probability and the top-k, or an error."""

    input: str  # what the input was, for messages and CSVs: a path, an id, or "item N"
    label: str | None = None
    score: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    probs: np.ndarray | None = None  # (n_classes,), columns in the classifier's classes_ order
    error: str | None = None
    warning: str | None = None  # the prediction exists but is a guess (e.g. an empty text)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: label, score, top_k as [{"label", "score"}], error, warning."""
        return {"input": self.input, "label": self.label, "score": self.score,
                "top_k": [{"label": c, "score": p} for c, p in self.top_k], "error": self.error, "warning": self.warning}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _flip(x: Any) -> Any:
    """Mirror the last (width) axis of a numpy array or a tensor."""
    return np.ascontiguousarray(x[..., ::-1]) if isinstance(x, np.ndarray) else x.flip(-1)


def predict_probs(backend: Any, batches: Iterable[Mapping[str, Any]], tta: bool = False) -> np.ndarray:
    """Softmax probabilities (N, C) of batches of model inputs; with `tta`, images are averaged with their mirror."""
    out = []
    for batch in batches:
        p = softmax(backend.run(batch))
        if tta and "pixel_values" in batch:
            p = (p + softmax(backend.run({**batch, "pixel_values": _flip(batch["pixel_values"])}))) / 2
        out.append(p)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _name(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return display(os.fspath(item))
    return f"item {i}"


def predict_items(pre: Any, backend: Any, classes: Sequence[str], inputs: Sequence[Any], batch_size: int = 64,
                  top_k: int = 1, tta: bool = False, names: Sequence[str] | None = None) -> list[Prediction]:
    """One Prediction per input, in input order. An input the preprocessor cannot use gets its error;
    the others are predicted in batches of `batch_size` (texts sorted by length, so batches carry little padding)."""
    k = max(1, min(top_k, len(classes)))
    names = list(names) if names is not None else [_name(x, i) for i, x in enumerate(inputs)]
    results = [Prediction(n) for n in names]

    def encode(i: int) -> Any:
        try:
            enc = pre.load(inputs[i])
        except DuoclassError as e:
            results[i].error = str(e)
            return None
        results[i].warning = pre.warning(inputs[i], enc)
        return enc

    def run(idx: list[int], encoded: list[Any]) -> None:
        probs = predict_probs(backend, [pre.collate(encoded)], tta)
        for i, p in zip(idx, probs):
            order = np.argsort(-p, kind="stable")[:k]
            r = results[i]
            r.probs, r.label, r.score = p, classes[order[0]], float(p[order[0]])
            r.top_k = [(classes[c], float(p[c])) for c in order]

    if pre.task == "text":  # token ids are small: encode everything, then batch by length
        encoded = {i: e for i in range(len(inputs)) if (e := encode(i)) is not None}
        order = length_order(encoded)
        for j in range(0, len(order), batch_size):
            idx = order[j : j + batch_size]
            run(idx, [encoded[i] for i in idx])
    else:  # decoded images are large: one batch in memory at a time
        for j in range(0, len(inputs), batch_size):
            pairs = [(i, e) for i in range(j, min(j + batch_size, len(inputs))) if (e := encode(i)) is not None]
            if pairs:
                run([i for i, _ in pairs], [e for _, e in pairs])
    return results


def length_order(encoded: Mapping[int, Any]) -> list[int]:
    """The order text inputs are batched in: by encoded length, ties in input order."""
    return sorted(encoded, key=lambda i: len(encoded[i]))


def probabilities(results: Sequence[Prediction], n_classes: int) -> np.ndarray:
    """(N, C) probabilities of the results; a row of NaN for an input that failed."""
    out = np.full((len(results), n_classes), np.nan, dtype=np.float32)
    for i, r in enumerate(results):
        if r.probs is not None:
            out[i] = r.probs
    return out


def evaluate_results(results: Sequence[Prediction], labels: Sequence[int], classes: list[str], top_k: int = 5,
                     where: str = "") -> dict[str, Any]:
    """Metrics of predictions against labels (class indices); failed inputs are skipped and counted."""
    from .metrics import classification_metrics

    kept = [i for i, r in enumerate(results) if r.ok]
    skipped = len(results) - len(kept)
    for r in results:
        if not r.ok:
            log.warning("skipped %s", r.error)
    if not kept:
        why = f"none of its {skipped} inputs could be read (see the warnings above)" if skipped else "it has no examples"
        raise DuoclassError(f"{where}: nothing to evaluate: {why}; fix the files or pass another --split")
    probs = np.stack([results[i].probs for i in kept])  # type: ignore[misc]
    y = np.asarray([labels[i] for i in kept], dtype=np.int64)
    m = classification_metrics(y, probs, classes, top_k=top_k, loss=cross_entropy(probs, y))
    m["skipped_files"] = skipped
    return m


def cross_entropy(probs: np.ndarray, y: np.ndarray) -> float | None:
    """Mean negative log-probability of the true class (the unweighted, unsmoothed validation loss)."""
    if not len(y):
        return None
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-12, None))))


# --- batch prediction into a CSV ---------------------------------------------------------------
def list_image_inputs(path: str | Path) -> list[str]:
    """Refs for a file, a folder (recursive), a zip, or a CSV with a `path` column."""
    p = Path(path)
    if not p.exists():
        raise DuoclassError(f"{p}: no such file or folder; pass an image, a folder, a zip or a CSV of paths")
    if p.is_dir():
        out = []
        for dirpath, dirnames, files in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [os.path.join(dirpath, f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTS and not f.startswith(".")]
        if not out:
            raise DuoclassError(f"{p}: no image files found (looked for {', '.join(sorted(IMAGE_EXTS))})")
        return out
    if p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                names = sorted(n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_EXTS and "__MACOSX" not in n)
        except (zipfile.BadZipFile, OSError) as e:
            raise DuoclassError(f"{p}: not a readable zip file ({e}); check the file or unzip it and pass the folder") from None
        return [f"{p}{ZIP_SEP}{n}" for n in names]
    if p.suffix.lower() in (".csv", ".tsv"):
        from .data.tables import read_table

        header, rows = read_table(p)
        if "path" not in header:
            raise DuoclassError(f"{p}: no 'path' column (columns: {', '.join(header)}); add a header row with a path column")
        return [r["path"] if os.path.isabs(r["path"]) else str(p.parent / r["path"]) for _, r in rows]
    return [str(p)]


def csv_inputs(task: str, input_path: str | Path, text_column: str) -> tuple[list[str], list[Any], str]:
    """What `duoclass predict` reads: (row keys, inputs, key column name). Text: the input's id column (or the
    0-based row number) and its texts; images: the display path of every image of a file, folder, zip or CSV."""
    if task == "text":
        from .data.text_files import read_predict_inputs

        keys, inputs = read_predict_inputs(input_path, text_column)
        return list(keys), list(inputs), "id"
    refs = list_image_inputs(input_path)
    return [display(r) for r in refs], refs, "path"


def predict_to_csv(clf: Any, input_path: str | Path, output: str | Path | None, top_k: int = 1, batch_size: int = 64,
                   text_column: str | None = None, labels_only: bool = False) -> tuple[int, int]:
    """Predict every input, in input order, into a CSV. Returns (rows, failed).

    Images: path,label,probability[,top_k],error,warning;  text: id,label,probability[,top_k],error,warning,
    with the input's id column (or the 0-based row number). An input that cannot be used keeps its row,
    with the reason in `error`; `warning` marks a guess (an empty text, a text with no known token).
    `labels_only` writes just the first two columns (e.g. id,label for a competition submission).
    Raises DuoclassError (after writing the CSV) when not a single input could be used.
    `duoclass predict --engine ray` (ray_predict.py) writes the same file from Ray workers.
    """
    k = max(1, min(top_k, len(clf.classes_)))
    column = (text_column or clf.preprocessor.text_column) if clf.task == "text" else ""
    keys, inputs, key = csv_inputs(clf.task, input_path, column)
    results = predict_items(clf.preprocessor, clf.backend, clf.classes_, inputs, batch_size, k, clf.tta, names=keys)
    return write_predictions_csv(results, key, k, labels_only, output, input_path)


def write_predictions_csv(results: Sequence[Prediction], key: str, k: int, labels_only: bool,
                          output: str | Path | None, input_path: str | Path) -> tuple[int, int]:
    """The CSV of `duoclass predict` (see predict_to_csv), written atomically to `output` or to stdout."""
    from .checkpoint import atomic_write_text, is_stdout

    header = [key, "label"] if labels_only else [key, "label", "probability"] + (["top_k"] if k > 1 else []) + ["error", "warning"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in results:
        row = [r.input, r.label or ""]
        if not labels_only:
            row.append(f"{r.score:.6f}" if r.score is not None else "")
            if k > 1:
                row.append(";".join(f"{c}:{p:.6f}" for c, p in r.top_k))
            row += [r.error or "", r.warning or ""]
        w.writerow(row)
    if output and not is_stdout(output):
        atomic_write_text(output, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
    failed = sum(not r.ok for r in results)
    warned = sum(r.warning is not None for r in results)
    if warned:
        log.warning("%d of %d inputs gave a guess rather than a prediction (see the warning column), e.g. %s: %s",
                    warned, len(results), next(r.input for r in results if r.warning), next(r.warning for r in results if r.warning))
    if failed and failed == len(results):
        raise DuoclassError(f"{input_path}: none of the {failed} inputs could be used (e.g. {results[0].error}); "
                            "see the error column")
    if failed:
        log.warning("%d of %d inputs could not be read; their rows carry the error", failed, len(results))
    return len(results), failed
