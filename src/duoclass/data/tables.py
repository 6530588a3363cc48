"""CSV/TSV reading with encoding detection, shared by image manifests and text data.

Encodings tried, in order: UTF-8 (with or without BOM), then GB18030 (a superset of
GBK and GB2312, common for Chinese CSVs). A file that is neither gets one clear error.
Row numbers in messages are the file's line numbers (the header is line 1).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from duoclass.errors import DuoclassError

ENCODINGS = ("utf-8-sig", "gb18030")


def decode_text(path: Path, raw: bytes) -> tuple[str, str]:
    """Return (text, encoding) of a file's bytes, or raise a clear error."""
    for enc in ENCODINGS:
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
    raise DuoclassError(
        f"{path}: line {line}: cannot decode the file as UTF-8 or GBK/GB18030; re-save it as UTF-8"
    )


def read_table(path: str | Path, keep_blank_rows: bool = False) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV (or TSV by extension) into (header, [(line_number, row), ...]).

    Rows whose fields are all blank are skipped, unless `keep_blank_rows` (prediction inputs, where every
    row must come back): then only empty lines are skipped, and in a one-column file an empty line
    followed by more data is an empty value too (pandas writes an empty string there as `""`, a hand-made
    file as nothing).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DuoclassError(f"{path}: cannot read ({e.strerror})") from None
    text, _ = decode_text(path, raw)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DuoclassError(f"{path}: the file is empty; add a header row and data rows") from None
    except csv.Error as e:
        raise DuoclassError(f"{path}: line 1: malformed CSV ({e})") from None
    header = [h.strip() for h in header]
    if delimiter == "," and len(header) == 1 and header[0].count(";") >= 1:
        raise DuoclassError(f"{path}: line 1: the header {header[0][:60]!r} looks separated by semicolons; "
                            "save the file with commas (or as .tsv with tabs)")
    seen = set()
    for h in header:
        if h in seen and h:
            raise DuoclassError(f"{path}: line 1: duplicate column name {h!r}; rename one of them")
        seen.add(h)
    rows: list[tuple[int, dict[str, str]]] = []
    blank_lines: list[int] = []  # one-column file, keep_blank_rows: empty lines not yet known to be trailing
    start = reader.line_num + 1
    try:
        for values in reader:
            line = start
            start = reader.line_num + 1
            if keep_blank_rows:
                if not values:
                    if len(header) == 1:
                        blank_lines.append(line)
                    continue
                rows += [(n, {header[0]: ""}) for n in blank_lines]
                blank_lines = []
            elif not values or all(not v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise DuoclassError(
                    f"{path}: line {line}: {len(values)} fields but the header has {len(header)}; "
                    "quote fields that contain the delimiter"
                )
            rows.append((line, dict(zip(header, values))))
    except csv.Error as e:
        raise DuoclassError(f"{path}: line {reader.line_num}: malformed CSV ({e}); check the quoting") from None
    return header, rows
