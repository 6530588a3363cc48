"""The prediction CSV of `duoclass predict`: which inputs a file, folder, zip or CSV holds, and the one writer.

Images: path,label,probability[,top_k][,set][,abstained],error,warning; text: id,label,... the same. `set` (the
conformal prediction set, classes joined by ";") when the model has a conformal calibration, `abstained` (true or
false) with --abstain-below. Every input keeps its row; `-` (or a path that is standard output) prints the CSV.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence


from duoclass.data.sources import IMAGE_EXTS, ZIP_SEP, display
from duoclass.errors import DuoclassError
from duoclass.infer.predict import Prediction, predict_items, resolve_top_k

log = logging.getLogger("duoclass")


# --- batch prediction into a CSV ---------------------------------------------------------------
TEXT_HINTS = ("testa.csv", "testa.tsv", "testa.jsonl", "train.csv", "test.csv")


def _keep_all(p: Path, names: list[str]) -> list[str]:
    """Every file of a folder or zip is an input: one whose extension is not an image's keeps its row, with the
    reader's error, and is counted here by extension, so nothing leaves the prediction unseen."""
    other: dict[str, int] = {}
    for n in names:
        ext = Path(n).suffix.lower()
        if ext not in IMAGE_EXTS:
            other[ext or "no extension"] = other.get(ext or "no extension", 0) + 1
    if other:
        log.warning("%s: %d of %d files have no image extension (%s); each keeps its row with the reason, e.g. "
                    "convert DICOM (.dcm) to PNG first", p, sum(other.values()), len(names),
                    ", ".join(f"{k}: {v}" for k, v in sorted(other.items())))
    return names


def _no_images(p: Path, names: list[str]) -> None:
    """A folder or zip without one image file: say what it holds (texts, for a text model) and stop."""
    texts = [n for n in names if Path(n).name.lower() in TEXT_HINTS or Path(n).suffix.lower() in (".csv", ".tsv", ".jsonl")]
    if texts:
        raise DuoclassError(f"{p}: holds text files ({Path(texts[0]).name}), not images, and this is an image model; "
                            "predict the texts with a text model, or pass images")
    raise DuoclassError(f"{p}: no image files found (looked for {', '.join(sorted(IMAGE_EXTS))})")


def list_image_inputs(path: str | Path, path_column: str = "path") -> list[str]:
    """Refs for a file, a folder (recursive), a zip, or a CSV with a `path` column. Every file of a folder or zip
    counts (hidden ones, names starting with ".", aside): one that is not an image gets its row and its error."""
    p = Path(path)
    if not p.exists():
        raise DuoclassError(f"{p}: no such file or folder; pass an image, a folder, a zip or a CSV of paths")
    if p.is_dir():
        out = []
        for dirpath, dirnames, files in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [os.path.join(dirpath, f) for f in sorted(files) if not f.startswith(".")]
        if not any(Path(f).suffix.lower() in IMAGE_EXTS for f in out):
            _no_images(p, out)
        return _keep_all(p, out)
    if p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                names = sorted(n for n in zf.namelist() if not n.endswith("/") and "__MACOSX" not in n
                               and not Path(n).name.startswith("."))
        except (zipfile.BadZipFile, OSError) as e:
            raise DuoclassError(f"{p}: not a readable zip file ({e}); check the file or unzip it and pass the folder") from None
        if not any(Path(n).suffix.lower() in IMAGE_EXTS for n in names):
            _no_images(p, names)
        return [f"{p}{ZIP_SEP}{n}" for n in _keep_all(p, names)]
    if p.suffix.lower() in (".csv", ".tsv"):
        from duoclass.data.tables import read_table

        header, rows = read_table(p)
        if path_column not in header and "text" in header:
            raise DuoclassError(f"{p}: holds texts (a 'text' column), and this is an image model; predict them with "
                                "a text model, or pass a CSV with a 'path' column of image files")
        if path_column not in header:
            raise DuoclassError(f"{p}: no {path_column!r} column (columns: {', '.join(header)}); add a header row with a "
                                "path column, or name it with --path-column")
        return [r[path_column] if os.path.isabs(r[path_column]) else str(p.parent / r[path_column]) for _, r in rows]
    return [str(p)]


def csv_inputs(task: str, input_path: str | Path, column: str) -> tuple[list[str], list[Any], str]:
    """What `duoclass predict` reads: (row keys, inputs, key column name). Text: the input's id column (or the
    0-based row number) and its texts (`column`: the text column); images: the display path of every image of
    a file, folder, zip or CSV (`column`: a CSV manifest's path column)."""
    text_column = column
    if task == "text":
        from duoclass.data.text_files import read_predict_inputs

        keys, inputs = read_predict_inputs(input_path, text_column)
        return list(keys), list(inputs), "id"
    refs = list_image_inputs(input_path, column or "path")
    return [display(r) for r in refs], refs, "path"


def predict_to_csv(clf: Any, input_path: str | Path, output: str | Path | None, top_k: int | None = 1, batch_size: int = 64,
                   text_column: str | None = None, labels_only: bool = False,
                   path_column: str | None = None, abstain_below: float | None = None) -> tuple[int, int]:
    """Predict every input, in input order, into a CSV. Returns (rows, failed).

    Images: path,label,probability[,top_k],error,warning;  text: id,label,probability[,top_k],error,warning,
    with the input's id column (or the 0-based row number). An input that cannot be used keeps its row,
    with the reason in `error`; `warning` marks a guess (an empty text, a text with no known token).
    `top_k`: labels in the top_k column (None: every label; 1: no top_k column).
    `labels_only` writes just the first two columns (e.g. id,label for a competition submission).
    `abstain_below`: inputs whose calibrated top probability is under it get the label "abstained" and
    abstained=true (never a class).
    Raises DuoclassError (after writing the CSV) when not a single input could be used.
    `duoclass predict --engine ray` (ray_predict.py) writes the same file from Ray workers.
    """
    k = resolve_top_k(top_k, len(clf.classes_))
    rule = clf.rule(abstain_below)
    pre = clf.preprocessor  # the columns default to the training run's (a CSV manifest's path column too)
    column = (text_column or pre.text_column) if clf.task == "text" else (path_column or getattr(pre, "path_column", "path"))
    keys, inputs, key = csv_inputs(clf.task, input_path, column)
    results = predict_items(clf.preprocessor, clf.backend, clf.classes_, inputs, batch_size, k, clf.tta, names=keys,
                            rule=rule)
    return write_predictions_csv(results, key, k, labels_only, output, input_path, sets=rule.conformal is not None,
                                 abstain=abstain_below is not None)


def write_predictions_csv(results: Sequence[Prediction], key: str, k: int, labels_only: bool,
                          output: str | Path | None, input_path: str | Path, sets: bool = False,
                          abstain: bool = False) -> tuple[int, int]:
    """The CSV of `duoclass predict` (see predict_to_csv), written atomically to `output` or to stdout."""
    from duoclass.artifacts.atomic import atomic_write_text, is_stdout

    header = [key, "label"] if labels_only else ([key, "label", "probability"] + (["top_k"] if k > 1 else []) +
                                                 (["set"] if sets else []) + (["abstained"] if abstain else []) +
                                                 ["error", "warning"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in results:
        row = [r.input, r.label or ""]
        if not labels_only:
            row.append(f"{r.score:.6f}" if r.score is not None else "")
            if k > 1:
                row.append(";".join(f"{c}:{p:.6f}" for c, p in r.top_k))
            if sets:
                row.append(";".join(r.set) if r.set is not None else "")
            if abstain:
                row.append(("true" if r.abstained else "false") if r.ok else "")
            row += [r.error or "", r.warning or ""]
        w.writerow(row)
    if output and not is_stdout(output):
        atomic_write_text(output, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
    failed = sum(not r.ok for r in results)
    abstained = sum(r.abstained for r in results)
    if abstained:
        log.info("%d of %d inputs abstained (calibrated top probability under the threshold)", abstained, len(results))
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
