"""Atomic writes, and the one way a whole folder is replaced.

    atomic_write_text(path, text)          # temp file beside it -> fsync -> rename; a symlink is written through
    replace_folder(folder, blobs, verifies) # every file of the new folder, then one swap (see below)
    replace_folder_with(folder, write, verifies)  # the same, for a writer that fills the new folder itself

Files are written to a temp file in the same folder, fsynced, then renamed over the target, so a crash
leaves the old file or the new one. A symlink is written through to the file it names; a path that is
not a regular file (`/dev/stdout`, a pipe, a device) is written to directly.

A folder is replaced whole. The new one is written and fsynced beside the old one as
`.NAME.duoclass-new`, then swapped in: with one atomic exchange where the OS has it (Linux renameat2),
else by renaming the old folder to `.NAME.duoclass-old` and the new one into place. A crash between
those two renames leaves no folder at NAME; the next read or replace (`recover_folder`) finishes the
swap, so a kill at any moment leaves the old folder or the new one, never a mix. The next replace
deletes leftover siblings. Every file gets the permissions the umask allows (0666 & ~umask; folders
0777 & ~umask). Model folders (artifacts.folder) use `replace_folder`; pretraining folders and
transformers exports, whose files transformers writes, use `replace_folder_with`: the same swap.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import secrets
import stat
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from duoclass.errors import DuoclassError


log = logging.getLogger("duoclass")


# --- atomic writes ------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on every OS (Windows); the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write `data` and fsync. Mode 0666 & ~umask, unlike mkstemp's 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write `path` via a temp file in the same folder, fsync, then rename over the target.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    A symbolic link is written through, never replaced: the file it points to gets the new content
    (atomically, when that is a regular file or does not exist yet). A path that is not a regular
    file (`/dev/stdout`, a terminal, a pipe, `/dev/null`) cannot be renamed over; it is written to
    directly.
    """
    path = Path(path)
    if os.path.islink(path):
        try:
            st = os.stat(path)  # follows the link
        except FileNotFoundError:
            st = None  # a dangling link: create the file it names
        if st is None or stat.S_ISREG(st.st_mode):
            path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        if path.is_dir():
            raise DuoclassError(f"{path}: is a folder; give a file name to write")
        with open(path, "wb") as f:  # a device or pipe: there is nothing to rename over
            write(f)  # type: ignore[arg-type]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def is_stdout(path: str | Path | None) -> bool:
    """True for `-`, and for a path that is this process's standard output (`/dev/stdout`, /proc/self/fd/1)."""
    if path is None:
        return False
    if str(path) == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except (OSError, ValueError):
        return False


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mkdir(path: Path) -> None:
    os.mkdir(path)  # 0777 & ~umask, unlike mkdtemp's 0700


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as e:  # the save itself succeeded; the next one retries
        log.warning("could not delete %s (%s); the next save of the model folder deletes it", path, e.strerror or e)


_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # a C library without it
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


# --- replacing a whole folder ---------------------------------------------------------------
def _siblings(folder: Path) -> tuple[Path, Path]:
    """(.NAME.duoclass-new, .NAME.duoclass-old): where a replace writes the new folder and parks the old one."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}.duoclass-new"), folder.with_name(f".{folder.name}.duoclass-old")


def recover_folder(folder: str | Path, verifies: Callable[[Path], bool]) -> None:
    """Finish a folder replace that was interrupted between its two renames.

    That crash (possible only where the OS has no atomic exchange) leaves no folder at `folder`,
    the old one parked as `.NAME.duoclass-old` and the complete new one as `.NAME.duoclass-new`.
    The new one is moved into place (the old one when `verifies(new)` is false). Only renames:
    nothing is deleted, so this is safe while another process saves the folder.
    """
    folder = Path(folder)
    new, old = _siblings(folder)
    if not folder.exists() and old.is_dir():
        src = new if verifies(new) else old
        try:
            _rename(src, folder)
            _fsync_dir(folder.parent)
        except FileNotFoundError:
            pass  # another process finished it first
        except OSError as e:
            if not folder.is_dir():
                raise DuoclassError(f"{folder}: missing, but an interrupted save left the model in {src}; "
                                    f"rename {src} to {folder} ({e.strerror})") from None
        else:
            log.warning("%s: finished a save that was interrupted (moved %s into place)", folder, src.name)


def replace_folder(folder: Path, blobs: dict[str, bytes], verifies: Callable[[Path], bool]) -> None:
    """Write `blobs` (relative path -> bytes) as the folder's complete new content, then swap it in.

    Steps: clear leftovers -> mkdir .NAME.duoclass-new -> write and fsync each file (config.json
    last) -> fsync the folders -> swap -> fsync the parent -> delete the old folder. Each helper
    below is one step; a kill before any of them leaves `folder` as it was or complete and new.
    """
    def fill(new: Path) -> list[Path]:
        dirs = [new]
        for rel, data in blobs.items():
            path = new / rel
            for parent in reversed(path.relative_to(new).parents[:-1]):  # tokenizer/ before tokenizer/x.json
                if not (new / parent).is_dir():
                    _mkdir(new / parent)
                    dirs.append(new / parent)
            _write_file(path, data)
        return dirs

    _replace(folder, fill, verifies)


def replace_folder_with(folder: Path, write: Callable[[Path], None], verifies: Callable[[Path], bool]) -> None:
    """Replace `folder` whole, like replace_folder, by what `write(new)` puts into the empty folder `new`.

    For writers that write files themselves (transformers' save_pretrained): `new` is
    `.NAME.duoclass-new`, so recover_folder knows it. Once `write` returns, every file under `new`
    gets the permissions the umask allows and is fsynced, the folders are fsynced, and `new` is swapped
    in exactly as by replace_folder. If `write` raises, `new` is deleted and `folder` is left as it was.
    `verifies(path)` says whether a folder `write` wrote is complete (e.g. its last file exists).
    """
    def fill(new: Path) -> list[Path]:
        write(new)
        return _sync_tree(new)

    _replace(folder, fill, verifies)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # no os.umask round trip: threads see no change
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _sync_tree(folder: Path) -> list[Path]:
    """Give every file under `folder` the mode 0666 & ~umask (safetensors writes 0600) and fsync it; its folders, parents first."""
    mode = 0o666 & ~_umask()
    dirs = []
    for root, _, names in os.walk(folder):
        dirs.append(Path(root))
        for n in names:
            path = os.path.join(root, n)
            if os.path.islink(path):
                continue
            try:
                os.chmod(path, mode)
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass  # not possible on every OS; the swap is still atomic
            finally:
                os.close(fd)
    return dirs


def _replace(folder: Path, fill: Callable[[Path], list[Path]], verifies: Callable[[Path], bool]) -> None:
    """The one swap: `fill(new)` writes the new content into the empty `new` and returns its folders (parents first)."""
    folder = Path(os.path.abspath(folder))
    new, old = _siblings(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder, verifies)
    for leftover in (new, old):  # a save killed earlier; `folder` itself is intact
        if leftover.exists():
            _rmtree(leftover)
    _mkdir(new)
    try:
        dirs = fill(new)
        for d in reversed(dirs):
            _fsync_dir(d)
    except BaseException:  # a writer that failed: nothing has touched `folder` yet
        shutil.rmtree(new, ignore_errors=True)
        raise
    if not folder.exists():
        _rename(new, folder)
        leftover = None
    elif _exchange(new, folder):  # one atomic step: `folder` is the new content, `new` the old
        leftover = new
    else:
        _rename(folder, old)  # a crash right after this leaves no `folder`: recover_folder
        try:
            _rename(new, folder)
        except FileNotFoundError:
            if not folder.is_dir():  # not finished by a reader's recover_folder meanwhile
                raise
        leftover = old
    _fsync_dir(folder.parent)
    if leftover is not None:
        _rmtree(leftover)
