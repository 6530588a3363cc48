"""Where examples come from: ImageFolder trees, the same tree inside a .zip, CSV manifests.

Every reader yields `Split`s: for each split name (train/valid/test) a list of
(ref, label) pairs, where `ref` is a plain path or `zip::member` for zip members.
Bytes are read through `ByteReader`, which opens a zip lazily once per process, so
data-loader workers never share a file handle.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from duoclass.errors import DuoclassError
from duoclass.data.splits import SPLIT_ALIASES, class_order

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ZIP_SEP = "::"


@dataclass
class Dataset:
    """Examples of one dataset, grouped by split. Labels are class names (strings)."""

    root: str
    splits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # files seen in class folders that are not images by extension: (ref, reason)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    read_only: bool = False
    flat: bool = False  # a folder of class folders, no split folders: its examples stand as "train"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX") or name in {"Thumbs.db", "desktop.ini"}


class ByteReader:
    """Reads the bytes of a ref; zip archives are opened lazily, once per process."""

    def __init__(self) -> None:
        self._zips: dict[str, tuple[int, zipfile.ZipFile]] = {}

    def __call__(self, ref: str) -> bytes:
        if ZIP_SEP in ref:
            archive, member = ref.split(ZIP_SEP, 1)
            pid = os.getpid()
            entry = self._zips.get(archive)
            if entry is None or entry[0] != pid:
                entry = (pid, zipfile.ZipFile(archive))
                self._zips[archive] = entry
            return entry[1].read(member)
        with open(ref, "rb") as f:
            return f.read()

    def __getstate__(self) -> dict:
        return {"_zips": {}}


def display(ref: str) -> str:
    return ref.replace(ZIP_SEP, "/", 1) if ZIP_SEP in ref else ref


# --- folders ------------------------------------------------------------------------------
def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not _hidden(p.name))


def _read_class_tree(split_dir: Path, ds: Dataset, split: str) -> None:
    items: list[tuple[str, str]] = []
    class_dirs = _class_dirs(split_dir)
    if not class_dirs:
        raise DuoclassError(
            f"{split_dir}: no class folders found; expected {split_dir}/<class>/<image files>, one folder per class"
        )
    for cdir in class_dirs:
        n = 0
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            for name in sorted(filenames):
                if _hidden(name):
                    continue
                p = os.path.join(dirpath, name)
                if Path(name).suffix.lower() in IMAGE_EXTS:
                    items.append((p, cdir.name))
                    n += 1
                else:
                    ds.ignored.append((p, f"not an image file (extension {Path(name).suffix or 'none'!r})"))
        if n == 0 and split == "train":
            raise DuoclassError(
                f"{cdir}: class folder '{cdir.name}' has no images; add images to it or remove the folder"
            )
    ds.splits[split] = items


def _read_folder(root: Path) -> Dataset:
    ds = Dataset(root=str(root))
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)}
    named = {SPLIT_ALIASES[k]: v for k, v in subdirs.items() if k in SPLIT_ALIASES}
    if "train" in named:
        for split, path in named.items():
            _read_class_tree(path, ds, split)
    elif named:
        raise DuoclassError(
            f"{root}: has {', '.join(sorted(p.name for p in named.values()))} but no train/ folder; "
            "add root/train/<class>/... or point at a folder of class folders"
        )
    else:
        _read_class_tree(root, ds, "train")
        ds.flat = True
    return ds


def labelled_split(ds: Dataset, split: str, data: Any) -> tuple[list[tuple[str, str]], str]:
    """The examples to evaluate for `split`, and the split's name to report. A folder of class folders (such
    as xrays/test/<class>/...) has no splits: it is evaluated whole, named after the folder when that is a
    split name ('test' for xrays/test), else 'all'."""
    if ds.flat:
        return ds.splits.get("train", []), SPLIT_ALIASES.get(Path(ds.root).name.lower(), "all")
    if split not in ds.splits:
        raise DuoclassError(f"{data}: no '{split}' split (found: {', '.join(sorted(ds.splits))}); pass --split NAME")
    return ds.splits[split], split


# --- zip ----------------------------------------------------------------------------------
def _read_zip(path: Path) -> Dataset:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DuoclassError(f"{path}: not a readable zip file ({e}); check the download or unzip it and pass the folder") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    ds = Dataset(root=str(path), read_only=True)
    # Find a split folder at any depth: .../<split>/<class>/<file>.
    parsed = []
    for n in names:
        parts = PurePosixPath(n).parts
        if any(_hidden(p) for p in parts):
            continue
        parsed.append((n, parts))
    split_depth = None
    for n, parts in parsed:
        for i, part in enumerate(parts[:-2]):
            if part.lower() in SPLIT_ALIASES and (split_depth is None or i < split_depth):
                split_depth = i
    buckets: dict[str, list[tuple[str, str]]] = {}
    for n, parts in parsed:
        if split_depth is not None:
            if len(parts) < split_depth + 3 or parts[split_depth].lower() not in SPLIT_ALIASES:
                continue
            split, label = SPLIT_ALIASES[parts[split_depth].lower()], parts[split_depth + 1]
        else:
            if len(parts) < 2:
                continue
            # <maybe one top folder>/<class>/<file>
            split, label = "train", parts[-2]
        ref = f"{path}{ZIP_SEP}{n}"
        if PurePosixPath(n).suffix.lower() in IMAGE_EXTS:
            buckets.setdefault(split, []).append((ref, label))
        else:
            ds.ignored.append((ref, f"not an image file (extension {PurePosixPath(n).suffix or 'none'!r})"))
    if "train" not in buckets:
        raise DuoclassError(f"{path}: no images in a train/<class>/ or <class>/ layout inside the zip")
    ds.splits = {k: sorted(v) for k, v in buckets.items()}
    return ds


# --- CSV manifest -------------------------------------------------------------------------
def _read_manifest(path: Path, path_column: str = "path", label_column: str = "label") -> Dataset:
    from duoclass.data.tables import read_table

    header, rows = read_table(path)
    if path_column not in header:
        raise DuoclassError(
            f"{path}: no '{path_column}' column (columns: {', '.join(header) or 'none'}); "
            f"add a header row with {path_column},{label_column} or pass --path-column NAME"
        )
    if label_column not in header:
        raise DuoclassError(
            f"{path}: no '{label_column}' column (columns: {', '.join(header)}); add it or pass --label-column NAME"
        )
    has_split = "split" in header
    ds = Dataset(root=str(path))
    base = path.parent
    for lineno, row in rows:
        p, label = (row.get(path_column) or "").strip(), (row.get(label_column) or "").strip()
        if not p:
            raise DuoclassError(f"{path}, row {lineno}: empty {path_column}; fill it in or delete the row")
        if not label:
            raise DuoclassError(f"{path}, row {lineno}: empty {label_column} for {p}; fill it in or delete the row")
        split = "train"
        if has_split and (row.get("split") or "").strip():
            s = row["split"].strip().lower()
            if s not in SPLIT_ALIASES:
                raise DuoclassError(f"{path}, row {lineno}: unknown split {row['split']!r}; use train, valid or test")
            split = SPLIT_ALIASES[s]
        full = p if os.path.isabs(p) else str(base / p)
        ds.splits.setdefault(split, []).append((full, label))
    if "train" not in ds.splits:
        raise DuoclassError(f"{path}: the manifest has no training rows")
    return ds


def read_image_dataset(data: str | os.PathLike, path_column: str = "path", label_column: str = "label") -> Dataset:
    """Read an image dataset from a folder, a zip, or a CSV manifest."""
    p = Path(data)
    if not p.exists():
        raise DuoclassError(f"{p}: no such file or folder; pass an ImageFolder tree, a .zip of one, or a CSV manifest")
    if p.is_dir():
        ds = _read_folder(p)
    elif p.suffix.lower() == ".zip":
        ds = _read_zip(p)
    elif p.suffix.lower() in {".csv", ".tsv"}:
        ds = _read_manifest(p, path_column, label_column)
    else:
        raise DuoclassError(f"{p}: unsupported dataset file; use a folder, a .zip or a .csv manifest of path,label")
    classes = class_order(label for _, label in ds.splits["train"])
    if len(classes) < 2:
        only = f" (only '{classes[0]}')" if classes else ""
        raise DuoclassError(
            f"{p}: found {len(classes)} class{only} in the training data; a classifier needs at least 2 classes, "
            "one folder (or label) per class"
        )
    return ds
