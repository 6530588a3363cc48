"""Corrupt and unusual image files: `decode_image`, `duoclass clean` (API and CLI), and training on them.

Every file is generated here (Pillow/numpy) in an ImageFolder tree root/train/<class>/...:
two learnable classes of small RGB images, an exact duplicate, files that must be rejected
(truncated JPEG, zero bytes, text named .jpg, 1x1, a decompression bomb) and files that must
be converted on load (CMYK, 16-bit grey, palette+transparency, EXIF-rotated).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import duoclass
from duoclass.data.clean import DEFAULT_MAX_PIXELS, BadImage, decode_image

from .conftest import run_cli

CLASSES = {"apple": (220, 40, 40), "berry": (40, 40, 220)}  # class -> base colour (learnable)
N_GOOD = 12


# --- generating the files --------------------------------------------------------------------
def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _make_cases() -> dict[str, bytes]:
    """name -> bytes of every special file (bad and convertible)."""
    rng = np.random.default_rng(1)
    photo = _jpeg(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), quality=95)
    assert Image.open(io.BytesIO(photo)).size == (64, 64)  # the source of the truncated file is valid

    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # 0 = red (transparent), 1 = blue
    pal.paste(1, (8, 0, 16, 16))  # right half blue, left half transparent

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = Image.new("RGB", (20, 12), (200, 30, 30))

    grey16 = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))  # mid-grey at 16 bits
    assert grey16.mode == "I;16"

    # 10000 x 9000 = 90 M pixels > Pillow's ~89.5 M limit; a 1-bit blank PNG of ~11 KB.
    bomb = _png(Image.new("1", (10_000, 9_000)))
    assert len(bomb) < 100_000

    return {
        "truncated": photo[: len(photo) // 2],
        "empty": b"",
        "text": b"this is a note, not a JPEG\n" * 4,
        "tiny": _png(Image.new("RGB", (1, 1), (10, 20, 30))),
        "bomb": bomb,
        "cmyk": _jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))),  # pure red in CMYK
        "grey16": _png(grey16),
        "palette_alpha": _png(pal, transparency=0),
        "exif_rotated": _jpeg(rotated, exif=exif.tobytes(), quality=95),
    }


# name -> (file name, class, expected status, substring of the reason)
LAYOUT = {
    "truncated": ("truncated.jpg", "apple", "bad", "truncated"),
    "empty": ("empty.jpg", "apple", "bad", "empty"),
    "text": ("notes.jpg", "berry", "bad", "not an image"),
    "tiny": ("tiny.png", "berry", "bad", "too small"),
    "bomb": ("bomb.png", "apple", "bad", "pixel limit"),
    "cmyk": ("cmyk.jpg", "apple", "converted", "CMYK"),
    "grey16": ("grey16.png", "berry", "converted", "high bit depth"),
    "palette_alpha": ("palette.png", "berry", "converted", "palette+transparency"),
    "exif_rotated": ("rotated.jpg", "apple", "converted", "EXIF orientation 6"),
}
BAD = [k for k, v in LAYOUT.items() if v[2] == "bad"]
CONVERTED = [k for k, v in LAYOUT.items() if v[2] == "converted"]
DUPLICATE = ("apple", "zz_copy_of_img_000.png")  # sorts after its original, so it is the later copy
ORIGINAL = ("apple", "img_000.png")


@pytest.fixture(scope="module")
def cases() -> dict[str, bytes]:
    return _make_cases()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, cases) -> Path:
    """The tree, written once; tests that change files work on a copy (see `tree`)."""
    root = tmp_path_factory.mktemp("pristine") / "data"
    rng = np.random.default_rng(0)
    for cls, colour in CLASSES.items():
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(N_GOOD):
            noise = rng.integers(-40, 41, (16, 16, 3))
            a = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            (d / f"img_{i:03d}.png").write_bytes(_png(Image.fromarray(a, "RGB")))
    for key, (name, cls, _, _) in LAYOUT.items():
        (root / "train" / cls / name).write_bytes(cases[key])
    shutil.copyfile(root / "train" / ORIGINAL[0] / ORIGINAL[1], root / "train" / DUPLICATE[0] / DUPLICATE[1])
    return root


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    return root


def rel(root: Path, key: str) -> str:
    name, cls, _, _ = LAYOUT[key]
    return f"train/{cls}/{name}"


def hashes(*roots: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under the roots (keys prefixed by root index when several)."""
    out = {}
    for i, r in enumerate(roots):
        for p in sorted(r.rglob("*")):
            if p.is_file():
                key = p.relative_to(r).as_posix() if len(roots) == 1 else f"{i}:{p.relative_to(r).as_posix()}"
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def by_rel(report, root: Path) -> dict[str, object]:
    return {Path(f.path).resolve().relative_to(root.resolve()).as_posix(): f for f in report.findings}


# --- decode_image ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", BAD)
def test_decode_image_rejects_bad_files(cases, key) -> None:
    with pytest.raises(BadImage) as e:
        decode_image(cases[key])
    assert LAYOUT[key][3] in str(e.value)


def test_decode_image_reasons_are_specific(cases) -> None:
    # each bad file gets its own reason, not a generic one
    reasons = {}
    for key in BAD:
        with pytest.raises(BadImage) as e:
            decode_image(cases[key])
        reasons[key] = str(e.value)
    assert reasons["empty"].startswith("empty file")
    assert "1x1" in reasons["tiny"]
    assert "10000x9000" in reasons["bomb"]
    assert len(set(reasons.values())) == len(BAD)


def test_decode_image_pixel_limit_is_a_parameter(cases) -> None:
    # the limit applies before any pixel is decoded; a small image is refused under a tiny limit
    with pytest.raises(BadImage, match="pixel limit"):
        decode_image(cases["cmyk"], max_pixels=100)
    assert decode_image(cases["cmyk"], max_pixels=256).size == (16, 16)


def test_decode_image_cmyk(cases) -> None:
    notes: list[str] = []
    im = decode_image(cases["cmyk"], notes=notes)
    assert im.mode == "RGB" and im.size == (16, 16)
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert any("CMYK" in n for n in notes)


def test_decode_image_16bit_is_scaled_not_saturated(cases) -> None:
    notes: list[str] = []
    im = decode_image(cases["grey16"], notes=notes)
    a = np.asarray(im)
    assert im.mode == "RGB" and im.size == (16, 16)
    assert np.all(np.abs(a.astype(int) - 128) <= 1), np.unique(a)  # 32768 / 65535 * 255 ~ 128, not 255
    assert any("high bit depth" in n for n in notes)


def test_decode_image_16bit_full_range() -> None:
    a = np.zeros((4, 8), dtype=np.uint16)
    a[:, 4:] = 65535
    im = decode_image(_png(Image.fromarray(a)))
    out = np.asarray(im)[..., 0]
    assert out[:, :4].max() == 0 and out[:, 4:].min() == 255


def test_decode_image_palette_with_transparency(cases) -> None:
    notes: list[str] = []
    im = decode_image(cases["palette_alpha"], notes=notes)
    a = np.asarray(im)
    assert im.mode == "RGB" and im.size == (16, 16)
    assert (a[:, :8] == 255).all()  # transparent red composited on white, not shown as red
    assert (a[:, 8:] == [0, 0, 255]).all()
    assert any("palette+transparency" in n for n in notes)


def test_decode_image_exif_orientation(cases) -> None:
    assert Image.open(io.BytesIO(cases["exif_rotated"])).size == (20, 12)  # stored landscape
    notes: list[str] = []
    im = decode_image(cases["exif_rotated"], notes=notes)
    assert im.mode == "RGB" and im.size == (12, 20)  # displayed portrait
    assert any("EXIF orientation 6" in n for n in notes)


def test_decode_image_plain_rgb_has_no_notes(pristine) -> None:
    notes: list[str] = []
    im = decode_image((pristine / "train" / ORIGINAL[0] / ORIGINAL[1]).read_bytes(), notes=notes)
    assert im.mode == "RGB" and im.size == (16, 16) and notes == []


def test_decode_image_leaves_pillow_globals_alone(pristine) -> None:
    """decode_image runs in threads (clean, training); Pillow's bomb limit must survive that."""
    data = (pristine / "train" / ORIGINAL[0] / ORIGINAL[1]).read_bytes()
    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # make thread switches inside decode_image frequent
    try:
        for _ in range(2):
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: decode_image(data), range(1000)))
            assert Image.MAX_IMAGE_PIXELS == before_limit
        assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS
        assert list(warnings.filters) == before_filters
    finally:
        sys.setswitchinterval(old)
        Image.MAX_IMAGE_PIXELS = before_limit  # never leak a broken global into other tests


# --- clean(): report -------------------------------------------------------------------------
def test_clean_reports_every_case(tree, tmp_path) -> None:
    before = hashes(tree)
    rep = duoclass.clean(tree, report=tmp_path / "report")
    found = by_rel(rep, tree)
    assert set(found) == set(before)  # every file is in the report, once

    for key, (_, _, status, reason) in LAYOUT.items():
        f = found[rel(tree, key)]
        assert f.status == status, (key, f)
        assert reason in f.reason, (key, f.reason)
        assert f.split == "train" and f.label == LAYOUT[key][1]
        assert f.action == ""  # no quarantine asked: nothing done
    dup = found[f"train/{DUPLICATE[0]}/{DUPLICATE[1]}"]
    assert dup.status == "duplicate" and ORIGINAL[1] in dup.reason
    assert found[f"train/{ORIGINAL[0]}/{ORIGINAL[1]}"].status == "ok"
    goods = [f for k, f in found.items() if Path(k).name.startswith("img_")]
    assert len(goods) == 2 * N_GOOD and all(f.status == "ok" and f.reason == "" for f in goods)

    assert (rep.total, rep.ok, rep.converted, rep.bad, rep.duplicates, rep.ignored, rep.quarantined) == (
        len(before), 2 * N_GOOD, len(CONVERTED), len(BAD), 1, 0, 0)
    assert f"{len(BAD)} bad" in rep.summary() and "1 duplicates" in rep.summary()
    assert hashes(tree) == before  # reporting changes nothing

    # the JSON and CSV reports are written and say the same
    j = json.loads((tmp_path / "report.json").read_text())
    with open(tmp_path / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert j["bad"] == len(BAD) and j["duplicates"] == 1 and j["converted"] == len(CONVERTED) and j["total"] == len(before)
    assert len(j["findings"]) == len(rows) == len(before)
    assert [dict(f) for f in j["findings"]] == rows
    assert {(r["path"], r["status"], r["reason"]) for r in rows} == {(f.path, f.status, f.reason) for f in rep.findings}
    assert Counter(r["status"] for r in rows) == Counter(ok=2 * N_GOOD, converted=len(CONVERTED), bad=len(BAD), duplicate=1)


def test_clean_quarantine_moves_bad_and_duplicates(tree, tmp_path) -> None:
    before = hashes(tree)
    qdir = tmp_path / "quarantine"
    rep = duoclass.clean(tree, quarantine=qdir, report=tmp_path / "report")

    moved = [rel(tree, k) for k in BAD] + [f"train/{DUPLICATE[0]}/{DUPLICATE[1]}"]
    assert rep.quarantined == len(moved)
    after_root, after_q = hashes(tree), hashes(qdir)
    assert sorted(after_q) == sorted(moved)  # same relative paths, nothing else
    for r in moved:
        assert after_q[r] == before[r]  # byte-identical
        assert r not in after_root
    assert after_root == {k: v for k, v in before.items() if k not in moved}  # good and convertible files stay
    for key in CONVERTED:
        assert rel(tree, key) in after_root
    # nothing deleted: root + quarantine hold exactly the original multiset of contents
    assert Counter(after_root.values()) + Counter(after_q.values()) == Counter(before.values())

    found = by_rel(rep, tree)
    for r in moved:
        assert found[r].action.startswith("moved to ") and found[r].action.endswith(r.split("/")[-1])
    for key in CONVERTED:
        assert found[rel(tree, key)].action == ""
    j = json.loads((tmp_path / "report.json").read_text())
    assert j["quarantined"] == len(moved)

    # a second pass over the cleaned tree finds nothing left to move
    rep2 = duoclass.clean(tree, quarantine=qdir)
    assert rep2.bad == 0 and rep2.duplicates == 0 and rep2.quarantined == 0
    assert rep2.converted == len(CONVERTED) and rep2.ok == 2 * N_GOOD


def test_clean_refuses_quarantine_inside_dataset(tree) -> None:
    before = hashes(tree)
    with pytest.raises(duoclass.DuoclassError, match="inside the dataset"):
        duoclass.clean(tree, quarantine=tree / "quarantine")
    assert hashes(tree) == before


def test_clean_zip_is_report_only(pristine, tmp_path) -> None:
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(pristine.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(pristine).as_posix())
    zhash = hashlib.sha256(zpath.read_bytes()).hexdigest()
    qdir = tmp_path / "quarantine"

    rep = duoclass.clean(zpath, quarantine=qdir, report=tmp_path / "zreport")
    assert hashlib.sha256(zpath.read_bytes()).hexdigest() == zhash
    assert not qdir.exists() or not any(qdir.rglob("*"))
    assert rep.quarantined == 0
    found = {f.path.split("data.zip/", 1)[1]: f for f in rep.findings}
    assert len(found) == len(rep.findings) == len(hashes(pristine))
    for key, (_, _, status, reason) in LAYOUT.items():
        f = found[rel(pristine, key)]
        assert f.status == status and reason in f.reason, (key, f)
    assert found[f"train/{DUPLICATE[0]}/{DUPLICATE[1]}"].status == "duplicate"
    flagged = [f for f in rep.findings if f.status in ("bad", "duplicate")]
    assert len(flagged) == len(BAD) + 1
    assert all("read-only" in f.action for f in flagged)
    assert all(f.action == "" for f in rep.findings if f.status in ("ok", "converted"))
    assert (rep.bad, rep.duplicates, rep.converted, rep.ok) == (len(BAD), 1, len(CONVERTED), 2 * N_GOOD)
    assert json.loads((tmp_path / "zreport.json").read_text())["bad"] == len(BAD)


# --- the CLI ---------------------------------------------------------------------------------
def test_cli_clean_prints_bad_files_and_summary(tree, tmp_path) -> None:
    before = hashes(tree)
    qdir = tmp_path / "q"
    r = run_cli("clean", str(tree), "--quarantine", str(qdir), "--report", str(tmp_path / "cli_report"), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for key in BAD:
        name, cls, _, reason = LAYOUT[key]
        hit = [ln for ln in lines if ln.strip().startswith("bad") and ln.split(": ", 1)[0].endswith(f"{cls}/{name}")]
        assert len(hit) == 1, (key, r.stdout)
        assert reason in hit[0] and "[moved to " in hit[0]
    grouped = [ln for ln in lines if ln.startswith("converted on load (usable as they are")]
    assert len(grouped) == 1, r.stdout  # conversions are counted by kind, not listed file by file
    for key in CONVERTED:
        name, _, _, note = LAYOUT[key]
        assert note in grouped[0] and not any(name in ln for ln in lines), (key, r.stdout)
    assert any(ln.strip().startswith("duplicate") and DUPLICATE[1] in ln and "[moved to " in ln for ln in lines)
    assert not any("img_001.png" in ln for ln in lines)  # ok files are not listed
    problems = [i for i, ln in enumerate(lines) if ln.strip().startswith(("bad", "duplicate"))]
    assert problems == list(range(len(problems)))  # the problems come first
    assert (f"{len(before)} files checked: {2 * N_GOOD + len(CONVERTED)} usable ({2 * N_GOOD} as they are, "
            f"{len(CONVERTED)} converted on load), {len(BAD)} bad, 1 duplicates, 0 non-image files; "
            f"{len(BAD) + 1} moved to quarantine") in r.stdout
    listed = run_cli("clean", str(tree), "--list-converted", timeout=120).stdout.splitlines()
    for key in CONVERTED:
        name, _, _, note = LAYOUT[key]
        assert any(ln.strip().startswith("converted") and name in ln and note in ln for ln in listed), (key, listed)
    for quiet in (["-q", "clean", str(tree)], ["clean", str(tree), "-q"]):
        out = run_cli(*quiet, timeout=120).stdout.splitlines()
        assert len(out) == 1 and "files checked" in out[0], out
    assert "cli_report.json" in r.stdout and (tmp_path / "cli_report.json").is_file() and (tmp_path / "cli_report.csv").is_file()
    moved = [rel(tree, k) for k in BAD] + [f"train/{DUPLICATE[0]}/{DUPLICATE[1]}"]
    assert sorted(hashes(qdir)) == sorted(moved)
    assert hashes(tree) == {k: v for k, v in before.items() if k not in moved}


# --- training on the corrupt folder ----------------------------------------------------------
def test_training_skips_bad_files_and_leaves_data_alone(tree, tmp_path) -> None:
    before = hashes(tree)
    run = tmp_path / "run"
    clf = duoclass.train(
        str(tree), model="msresnet-tiny", image_size=16, epochs=1, batch_size=8, output=str(run),
        progress=False, valid_fraction=0.25, device="cpu",
    )
    assert clf.classes_.tolist() == sorted(CLASSES)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_files"] == len(BAD) == 5
    assert metrics["ignored_files"] == 0
    assert clf.result_.skipped == len(BAD)
    assert (run / "model").is_dir()

    with open(run / "skipped.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = {Path(r["path"]).resolve().relative_to(tree.resolve()).as_posix(): r for r in rows}
    assert sorted(got) == sorted(rel(tree, k) for k in BAD)
    for key in BAD:
        r = got[rel(tree, key)]
        assert r["status"] == "bad" and LAYOUT[key][3] in r["reason"], r
        assert r["label"] == LAYOUT[key][1]

    # the model reads the convertible files the same way at prediction time; a bad one gets its own
    # error (naming the file and why) and does not stop the others
    preds = clf.predict([str(tree / rel(tree, k)) for k in CONVERTED])
    assert len(preds) == len(CONVERTED) and set(preds) <= set(CLASSES)
    truncated = str(tree / rel(tree, "truncated"))
    results = clf.predict_results([truncated, str(tree / rel(tree, "cmyk"))])
    assert not results[0].ok and "truncated" in results[0].error and "truncated.jpg" in results[0].error
    assert results[1].ok and results[1].label in CLASSES

    # the data folder is byte-for-byte unchanged: same paths, same contents
    assert hashes(tree) == before


# --- quarantine never reaches outside the data root ---------------------------------------------
def test_manifest_quarantine_never_moves_files_outside_the_data_root(pristine, cases, tmp_path) -> None:
    """A manifest row may name `../x` or an absolute path: such files are reported, never moved."""
    root = tmp_path / "ds"
    shutil.copytree(pristine / "train", root / "img")
    outside_rel = tmp_path / "precious.jpg"  # reached as ../precious.jpg from the manifest's folder
    outside_abs = tmp_path / "elsewhere" / "notes.jpg"
    outside_abs.parent.mkdir()
    outside_rel.write_bytes(cases["truncated"])
    outside_abs.write_bytes(cases["text"])
    before = {p: p.read_bytes() for p in (outside_rel, outside_abs)}
    rows = ["path,label"] + [f"img/{c}/img_{i:03d}.png,{c}" for c in CLASSES for i in range(4)]
    rows += ["img/apple/empty.jpg,apple", "../precious.jpg,apple", f"{outside_abs},berry"]
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    qdir = tmp_path / "quarantine"

    r = run_cli("clean", str(manifest), "--quarantine", str(qdir), "--report", str(tmp_path / "report"), timeout=120)
    assert r.returncode == 0, r.stderr
    for p, data in before.items():
        assert p.is_file() and p.read_bytes() == data, f"{p} was moved or changed"
    assert (qdir / "img" / "apple" / "empty.jpg").is_file()  # the bad file inside the root is quarantined
    assert not (root / "img" / "apple" / "empty.jpg").exists()
    assert sorted(p.name for p in qdir.rglob("*") if p.is_file()) == ["empty.jpg"]
    lines = r.stdout.splitlines()
    for name in ("precious.jpg", "notes.jpg"):
        hit = [ln for ln in lines if ln.strip().startswith("bad") and name in ln]
        assert len(hit) == 1 and "[not moved: outside the data root" in hit[0], r.stdout
    assert "1 moved to quarantine; 2 outside the data root not moved" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quarantined"] == 1 and report["outside_root"] == 2
