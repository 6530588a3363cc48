"""Batch prediction into a CSV: one row per input, in input order (images: failures kept with their error; text: ids kept)."""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .data.sources import IMAGE_EXTS, ZIP_SEP, display
from .errors import DuoclassError

log = logging.getLogger("duoclass")


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


def predict_to_csv(clf: Any, input_path: str | Path, output: str | Path | None, top_k: int = 1, batch_size: int = 64,
                   text_column: str | None = None) -> tuple[int, int]:
    """Predict every input, in input order, into a CSV. Returns (rows, failed).

    Images: path,label,probability[,top_k],error (unreadable files keep a row with the error).
    Text:   id,label[,probability,top_k] with the input's id column (or the 0-based row number).
    """
    from .checkpoint import atomic_write_text
    from .engine import predict_probs

    pre = clf.preprocessor
    k = max(1, min(top_k, len(clf.classes_)))
    text = clf.config_["task"] == "text"
    if text:
        from .text import read_predict_inputs

        keys, inputs = read_predict_inputs(input_path, text_column or pre.text_column)
        header = ["id", "label"] + (["probability", "top_k"] if k > 1 else [])
    else:
        inputs = list_image_inputs(input_path)
        keys = [display(r) for r in inputs]
        header = ["path", "label", "probability"] + (["top_k"] if k > 1 else []) + ["error"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    failed = 0
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        encoded, errors = [], []
        for item in chunk:
            try:
                encoded.append(pre.load(item))
                errors.append(None)
            except DuoclassError as e:
                errors.append(str(e))
        probs = predict_probs(clf.model, [pre.collate(encoded)], clf.device) if encoded else np.zeros((0, 0))
        j = 0
        for key, err in zip(keys[i : i + batch_size], errors):
            if err is not None:
                failed += 1
                w.writerow([key] + [""] * (len(header) - 2) + [err])
                continue
            p = probs[j]
            j += 1
            order = np.argsort(-p)[:k]
            row = [key, clf.classes_[order[0]]]
            if not text or k > 1:
                row.append(f"{p[order[0]]:.6f}")
            if k > 1:
                row.append(";".join(f"{clf.classes_[c]}:{p[c]:.6f}" for c in order))
            w.writerow(row + ([] if text else [""]))
    if output:
        atomic_write_text(output, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    if failed:
        log.warning("%d of %d inputs could not be read; their rows carry the error", failed, len(inputs))
    return len(inputs), failed
