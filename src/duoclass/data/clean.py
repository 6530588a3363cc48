"""Decoding every image fully, converting odd formats to RGB, and quarantining bad files.

`decode_image` is the one decoder used by cleaning, training and prediction, so a file
that `duoclass clean` accepts is read the same way everywhere.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from duoclass.errors import DuoclassError
from duoclass.data.sources import ByteReader, Dataset, display, read_image_dataset

# Pillow's own decompression-bomb threshold (about 89.5 megapixels) is our default limit.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MIN_SIDE = 2


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason."""


# Bytes per pixel Pillow keeps for an image of each mode (RGB and the other 3-band modes take 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_GREY = ("1", "L", "I;16", "I;16B", "I;16L", "I;16N")  # resized before they become RGB when a size is given
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def decode_cost(size: tuple[int, int], mode: str, info: dict | None = None) -> int:
    """Bytes `decode_image(..., size=S)` holds at its peak for an image of this size and mode, from its header
    alone: the decoded pixels, plus the full-size copies its conversion to RGB makes (grey images are shrunk
    before they become RGB, so they never take the 4 bytes a pixel of RGB)."""
    w, h = size
    own = _MODE_BYTES.get(mode, 4)
    if mode in _GREY:
        extra = 0 if mode == "L" else 1  # one L copy (from 1-bit, or 16-bit through a lookup table)
    elif mode in ("I", "F"):
        extra = 8 + 1  # a float64 copy, then 8-bit
    elif mode == "RGB":
        extra = 0
    elif mode in _ALPHA or (mode == "P" and info and "transparency" in info):
        extra = 4 * 4  # RGBA, the white background, the composite, then RGB
    else:
        extra = 4  # the RGB copy
    return w * h * (own + extra)


# 16-bit grey -> 8-bit: the same float64 arithmetic as below, done once per value instead of once per pixel.
_LUT16: np.ndarray | None = None


def _lut16() -> np.ndarray:
    global _LUT16
    if _LUT16 is None:
        _LUT16 = np.clip(np.arange(65536, dtype=np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _LUT16


def _grey_to_l(im: Image.Image, notes: list[str]) -> Image.Image:
    """A grey image (1-bit, 8-bit or 16-bit) as mode L, with the 8-bit values `_to_rgb` gives its RGB copy."""
    if im.mode == "L":
        notes.append("converted L to RGB")
        return im
    if im.mode == "1":
        notes.append("converted 1 to RGB")
        return im.convert("L")
    notes.append(f"converted {im.mode} (high bit depth) to 8-bit RGB")
    return Image.fromarray(_lut16()[np.asarray(im)], "L")


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255) else 255.0
        if mode == "F":
            top = float(a.max(initial=1.0)) or 1.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        notes.append(f"converted {mode} (high bit depth) to 8-bit RGB")
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        notes.append("converted palette+transparency to RGB")
    elif mode not in ("RGBA", "LA"):
        notes.append(f"converted {mode} to RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        if mode not in ("P",):
            notes.append(f"converted {mode} to RGB (alpha composited on white)")
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, notes: list[str] | None = None,
                 size: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """Decode bytes fully into an RGB PIL image with EXIF orientation applied; with `size`, the RGB image
    resized to (size, size) bilinearly, exactly as `preprocess.image.to_uint8` resizes the full one (grey
    images are resized while still grey, which gives the same pixels from a quarter of the memory).

    `max_bytes` refuses, before decoding, an image whose decoding would hold more than that many bytes
    (`decode_cost`, from the declared size and pixel format: a small file can declare a huge image).
    Raises BadImage with a human-readable reason for anything unusable.
    """
    notes = [] if notes is None else notes
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        # Pillow warns above its limit and refuses at twice it; we apply our own limit just below,
        # without touching Pillow's or the warnings module's process-wide state (threads decode at once).
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"over the pixel limit ({e}; possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised file content)") from None
    except Exception as e:
        raise BadImage(f"cannot open image ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"over the pixel limit ({w}x{h} = {w * h:,} pixels > {max_pixels:,}; possible decompression bomb)")
    if min(w, h) < MIN_SIDE:
        raise BadImage(f"too small ({w}x{h} px; at least {MIN_SIDE}x{MIN_SIDE} is needed)")
    if max_bytes is not None and (cost := decode_cost(im.size, im.mode, im.info)) > max_bytes:
        raise BadImage(f"too costly to decode ({w}x{h} px in mode {im.mode} would take about {cost / 2**20:,.0f} MiB; "
                       f"the limit is {max_bytes / 2**20:,.0f} MiB): send a smaller image")
    try:
        im.load()
    except Exception as e:
        msg = str(e) or type(e).__name__
        raise BadImage(f"truncated or corrupt image data ({msg})") from None
    try:
        exif_orientation = im.getexif().get(0x0112, 1)
    except Exception:
        exif_orientation = 1
    if exif_orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"applied EXIF orientation {exif_orientation}")
    if size is None:
        return _to_rgb(im, notes)
    if im.mode in _GREY:
        im = _grey_to_l(im, notes)
    else:
        im = _to_rgb(im, notes)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return im.convert("RGB")


@dataclass
class Finding:
    path: str
    split: str
    label: str
    status: str  # ok | converted | bad | duplicate | ignored
    reason: str
    action: str = ""


def scan_refs(
    refs: Iterable[tuple[str, str, str]],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
    keep: Callable[[Image.Image], Any] | None = None,
) -> list[tuple[Finding, str | None, Any]]:
    """Decode every (ref, split, label) fully, once, in parallel.

    Returns (finding, sha256 or None, keep(image) or None) in input order; `keep` lets the
    caller hold on to what it needs of a good image (training keeps it resized in memory).
    """
    reader = ByteReader()

    def one(item: tuple[str, str, str]) -> tuple[Finding, str | None, Any]:
        ref, split, label = item
        try:
            data = reader(ref)
        except OSError as e:
            return Finding(display(ref), split, label, "bad", f"cannot read file ({e.strerror or e})"), None, None
        notes: list[str] = []
        digest = hashlib.sha256(data).hexdigest()
        try:
            im = decode_image(data, max_pixels, notes)
        except BadImage as e:
            return Finding(display(ref), split, label, "bad", str(e)), digest, None
        finding = Finding(display(ref), split, label, "converted" if notes else "ok", "; ".join(notes))
        return finding, digest, keep(im) if keep is not None else None

    with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 2) * 2)) as pool:
        return list(pool.map(one, list(refs), chunksize=32))


def mark_duplicates(results: list[tuple[Finding, str | None, Any]]) -> None:
    """Mark every later exact copy (same bytes) of a usable file as a duplicate of the first."""
    first: dict[str, Finding] = {}
    for f, digest, _ in results:
        if digest is None or f.status == "bad":
            continue
        if digest in first:
            orig = first[digest]
            f.status = "duplicate"
            cross = f" (also in split '{orig.split}': leaks between splits)" if orig.split != f.split else ""
            f.reason = f"exact duplicate of {orig.path}{cross}"
        else:
            first[digest] = f


@dataclass
class CleanReport:
    root: str
    total: int
    ok: int
    converted: int
    bad: int
    duplicates: int
    ignored: int
    quarantined: int
    findings: list[Finding]
    outside_root: int = 0  # files to quarantine that lie outside the data root: reported, never moved

    def summary(self) -> str:
        return (
            f"{self.root}: {self.total} files checked: {self.ok + self.converted} usable ({self.ok} as they are, "
            f"{self.converted} converted on load), {self.bad} bad, {self.duplicates} duplicates, "
            f"{self.ignored} non-image files"
            + (f"; {self.quarantined} moved to quarantine" if self.quarantined else "")
            + (f"; {self.outside_root} outside the data root not moved" if self.outside_root else "")
        )


def inside_root(path: Path, root: Path) -> bool:
    """Whether `path` lies in `root` once `..` and every symlinked folder are resolved.

    The file itself may be a symlink: moving it moves the link, never its target.
    """
    return path.parent.resolve().is_relative_to(root.resolve())


def clean(
    data: str | Path,
    quarantine: str | Path | None = None,
    report: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    path_column: str = "path",
    label_column: str = "label",
) -> CleanReport:
    """Check every image of a dataset; optionally move bad files and duplicates to `quarantine`.

    Nothing is ever deleted. A read-only source (a zip) is only reported. Only files inside the
    data root (the dataset folder; for a CSV manifest, the folder holding it) are ever moved:
    a manifest row naming `../x` or an absolute path elsewhere is reported with the reason.
    """
    ds: Dataset = read_image_dataset(data, path_column, label_column)
    refs = [(ref, split, label) for split, items in ds.splits.items() for ref, label in items]
    results = scan_refs(refs, max_pixels)
    mark_duplicates(results)
    findings = [f for f, _, _ in results]
    findings += [Finding(display(ref), "", Path(display(ref)).parent.name, "ignored", reason) for ref, reason in ds.ignored]
    moved = outside = 0
    if quarantine is not None:
        qdir = Path(quarantine)
        root = Path(data)
        if ds.read_only:
            for f in findings:
                if f.status in ("bad", "duplicate", "ignored"):
                    f.action = "reported only (read-only source)"
        else:
            qroot = root.parent if root.is_file() else root
            if qdir.resolve().is_relative_to(qroot.resolve()) and root.is_dir():
                raise DuoclassError(f"{qdir}: quarantine folder is inside the dataset {root}; choose a folder outside it")
            for f in findings:
                if f.status not in ("bad", "duplicate", "ignored"):
                    continue
                src = Path(f.path)
                if not inside_root(src, qroot):
                    f.action = (f"not moved: outside the data root {qroot} (only files under it are quarantined; "
                                "move or fix this one by hand)")
                    outside += 1
                    continue
                rel = (src.parent.resolve() / src.name).relative_to(qroot.resolve())
                dst = qdir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists():
                    dst = dst.with_name(f"{dst.stem}.{hashlib.sha1(str(src).encode()).hexdigest()[:8]}{dst.suffix}")
                shutil.move(str(src), str(dst))
                f.action = f"moved to {dst}"
                moved += 1
    count = lambda s: sum(f.status == s for f in findings)  # noqa: E731
    rep = CleanReport(
        root=str(data), total=len(findings), ok=count("ok"), converted=count("converted"), bad=count("bad"),
        duplicates=count("duplicate"), ignored=count("ignored"), quarantined=moved, findings=findings,
        outside_root=outside,
    )
    if report is not None:
        write_report(rep, report)
    return rep


def write_report(rep: CleanReport, path: str | Path) -> tuple[Path, Path]:
    """Write the report as JSON and CSV (same stem)."""
    from duoclass.artifacts.atomic import atomic_write_json, atomic_write_text

    p = Path(path)
    jpath, cpath = p.with_suffix(".json"), p.with_suffix(".csv")
    d = asdict(rep)
    atomic_write_json(jpath, d)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "split", "label", "status", "reason", "action"])
    w.writeheader()
    for f in rep.findings:
        w.writerow(asdict(f))
    atomic_write_text(cpath, buf.getvalue())
    return jpath, cpath
