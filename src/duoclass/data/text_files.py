"""Reading text datasets: CSV/TSV/JSONL files of a folder (train/valid/test) or one file.

Columns come from `--text-column` / `--label-column` (default text, label); an `id` column is
kept. Files may be UTF-8 (with or without BOM) or GBK/GB18030; quoted newlines are fine. A row
with empty text is skipped and counted; an empty label, a duplicate id or a missing column is an
error naming the file and line. Nothing here imports torch.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duoclass.errors import DuoclassError
from duoclass.data.clean import Finding
from duoclass.data.splits import split_name

log = logging.getLogger("duoclass")

TEXT_EXTS = (".csv", ".tsv", ".jsonl")
MISSING_LABELS = {"", "nan", "none", "null"}


# --- reading ---------------------------------------------------------------------------------
@dataclass
class TextRecord:
    id: str | None
    text: str
    label: str | None
    where: str  # "file: line N", for messages


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    from duoclass.data.tables import decode_text

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DuoclassError(f"{path}: cannot read ({e.strerror})") from None
    text, _ = decode_text(path, raw)
    rows, header = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DuoclassError(f"{path}: line {n}: not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DuoclassError(f"{path}: line {n}: expected a JSON object like {{\"text\": ..., \"label\": ...}}")
        header += [k for k in obj if k not in header]
        rows.append((n, obj))
    return header, rows


def _cell(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def read_text_file(
    path: str | Path, text_column: str = "text", label_column: str | None = "label", split: str = "",
    skip_empty: bool = True,
) -> tuple[list[TextRecord], list[Finding]]:
    """Records of one CSV/TSV/JSONL file and the skipped (empty-text) rows. label_column=None: unlabelled."""
    from duoclass.data.tables import read_table

    path = Path(path)
    header, rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_table(path, keep_blank_rows=not skip_empty)
    if not rows:
        raise DuoclassError(f"{path}: no data rows; add rows under the header")
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col is not None and col not in header:
            raise DuoclassError(
                f"{path}: no {col!r} column (columns: {', '.join(map(str, header))}); rename the column or pass {flag} NAME"
            )
    has_id = "id" in header
    records, skipped, seen = [], [], {}
    empty_ids, repeated = [], []  # prediction (skip_empty=False) keeps such rows and says so
    for line, row in rows:
        where = f"{path}: line {line}"
        rid = _cell(row.get("id")) if has_id else None
        if has_id:
            rid = (rid or "").strip()
            if not rid:
                if skip_empty:
                    raise DuoclassError(f"{where}: empty id; give every row an id or drop the id column")
                empty_ids.append(line)
            elif rid in seen:
                if skip_empty:
                    raise DuoclassError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]}); ids must be unique")
                repeated.append(f"{rid!r} (lines {seen[rid]} and {line})")
            else:
                seen[rid] = line
        label = None
        if label_column is not None:
            label = (_cell(row.get(label_column)) or "").strip()
            if label.lower() in MISSING_LABELS:
                raise DuoclassError(f"{where}: empty label ({label_column!r} is {label or 'blank'!r}); fill it in or remove the row")
        text = _cell(row.get(text_column))
        if text is None or not text.strip():
            if skip_empty:
                skipped.append(Finding(f"{path}:{line}", split, label or "", "bad", "empty text"))
                continue
            text = ""
        records.append(TextRecord(rid, text, label, where))
    if empty_ids:
        n = len(empty_ids)
        log.warning("%s: %d %s an empty id (e.g. line %d); %s predicted, the id column left empty", path, n,
                    "row has" if n == 1 else "rows have", empty_ids[0], "it is" if n == 1 else "they are")
    if repeated:
        log.warning("%s: %d %s, e.g. %s; every row is predicted in input order, so match them by position",
                    path, len(repeated), "id repeats" if len(repeated) == 1 else "ids repeat", repeated[0])
    return records, skipped


def find_split_files(folder: Path) -> dict[str, Path]:
    """train/valid/test files of a folder (valid may also be named validation, dev or val)."""
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        split = split_name(p.stem)
        if p.is_file() and split is not None and p.suffix.lower() in TEXT_EXTS:
            found.setdefault(split, []).append(p)
    for split, hits in found.items():
        if len(hits) > 1:
            raise DuoclassError(f"{folder}: several {split} files ({', '.join(p.name for p in hits)}); keep one of them")
    return {split: hits[0] for split, hits in found.items()}


def read_text_dataset(data: str | Path, text_column: str, label_column: str) -> tuple[dict[str, list[TextRecord]], list[Finding], bool]:
    """(records per split, skipped rows, single_file). A single file comes back as its 'train' split."""
    p = Path(data)
    if p.is_dir():
        files = find_split_files(p)
        if "train" not in files:
            raise DuoclassError(
                f"{p}: no train file; add train.csv (or .tsv/.jsonl) with columns {text_column},{label_column} "
                "(optionally valid.* and test.*), or pass a single CSV to split automatically"
            )
        single = False
    elif p.is_file():
        if p.suffix.lower() not in TEXT_EXTS:
            raise DuoclassError(f"{p}: unsupported text file type {p.suffix!r}; use .csv, .tsv or .jsonl")
        files, single = {"train": p}, True
    else:
        raise DuoclassError(f"{p}: no such file or folder; pass a folder with train/valid/test files or one CSV/TSV/JSONL")
    splits, skipped = {}, []
    for split, f in files.items():
        recs, sk = read_text_file(f, text_column, label_column, split)
        splits[split] = recs
        skipped += sk
    return splits, skipped, single


# --- prediction and evaluation inputs -------------------------------------------------------
def read_predict_inputs(path: str | Path, text_column: str = "text") -> tuple[list[str], list[str]]:
    """(ids, texts) of an unlabelled file, or of FOLDER/testa.csv; ids are 0-based row numbers without an id column."""
    p = Path(path)
    if p.is_dir():
        cands = [p / n for n in ("testa.csv", "testa.tsv", "testa.jsonl") if (p / n).is_file()]
        if not cands:
            from duoclass.data.sources import IMAGE_EXTS

            if any(f.suffix.lower() in IMAGE_EXTS for f in p.rglob("*") if f.is_file()):
                raise DuoclassError(f"{p}: holds images, and this is a text model; predict them with an image model, "
                                    "or pass a CSV/TSV/JSONL of texts")
            raise DuoclassError(f"{p}: no testa.csv in the folder; pass the CSV/TSV/JSONL file to predict")
        p = cands[0]
    elif not p.is_file():
        raise DuoclassError(f"{p}: no such file or folder; pass a CSV/TSV/JSONL of texts or a folder with testa.csv")
    if p.suffix.lower() == ".txt":  # one text per line, as `duoclass pretrain` reads a corpus; ids are line numbers - 1
        from duoclass.data.tables import decode_text

        lines = decode_text(p, p.read_bytes())[0].splitlines()
        if not lines:
            raise DuoclassError(f"{p}: the file is empty; put one text per line")
        empty = sum(not t.strip() for t in lines)
        if empty:
            log.warning("%s: %d lines are empty; they are predicted anyway", p, empty)
        return [str(i) for i in range(len(lines))], lines
    if p.suffix.lower() not in TEXT_EXTS:
        raise DuoclassError(f"{p}: unsupported text file type {p.suffix!r}; use .csv, .tsv, .jsonl or .txt (one text per line)")
    recs, _ = read_text_file(p, text_column, None, skip_empty=False)
    empty = sum(not r.text.strip() for r in recs)
    if empty:
        log.warning("%s: %d rows have empty text; they are predicted anyway", p, empty)
    ids = [r.id if r.id is not None else str(i) for i, r in enumerate(recs)]
    return ids, [r.text for r in recs]


def read_eval_split(data: str | Path, split: str, text_column: str, label_column: str) -> tuple[list[TextRecord], int, str]:
    """(records, skipped, where) of one labelled split: DATA/<split>.* of a folder, or all rows of one file."""
    p = Path(data)
    if p.is_dir():
        files = find_split_files(p)
        if split not in files:
            raise DuoclassError(f"{p}: no '{split}' split (found: {', '.join(sorted(files)) or 'none'}); pass --split NAME")
        f = files[split]
    elif p.is_file():
        f = p
        log.info("%s: one file, evaluating all of its rows", p)
    else:
        raise DuoclassError(f"{p}: no such file or folder")
    recs, skipped = read_text_file(f, text_column, label_column, split)
    return recs, len(skipped), str(f)


def holds_text(data: str | Path, text_column: str = "text", path_column: str = "path") -> bool:
    """Whether a dataset path holds text (train/valid/test CSV/TSV/JSONL files, a JSONL file, or a CSV with a
    text column and no path column) rather than images."""
    from duoclass.data.tables import read_table

    p = Path(data)
    if p.is_dir():
        return any(q.is_file() and q.suffix.lower() in TEXT_EXTS and split_name(q.stem) is not None for q in p.iterdir())
    if p.suffix.lower() == ".jsonl":
        return True
    if p.suffix.lower() in (".csv", ".tsv") and p.is_file():
        header, _ = read_table(p)
        return text_column in header and path_column not in header
    return False
