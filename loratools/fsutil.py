"""Atomic outputs: everything is written under a temporary name beside the destination,
fsynced, then renamed into place. An interrupted write leaves nothing at the destination.

The final rename refuses an output that appeared meanwhile (another run writing the same new
path): renameat2(RENAME_NOREPLACE) on Linux, a hard link (files) or an empty folder made first
(folders) elsewhere. Replacing an output needs ``check_output(..., overwrite=True)`` for that
path first; the old output is swapped out (RENAME_EXCHANGE) only once the new one is complete
and has passed the caller's ``check``, so a failed run leaves the previous output in place."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import OutputError

NAME_MAX = 255  # bytes, for a file name on Linux/macOS filesystems
_TMP_ROOM = 48  # ".tmp-" + pid + "-" + 8 hex digits + a short suffix, with room to spare

# outputs the user allowed to replace (check_output with overwrite=True): absolute paths
_REPLACE_OK: set[str] = set()


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _tmp_prefix(dest: Path) -> str:
    """``.NAME.tmp-`` for the temporary files of ``dest``; a name too long to carry that (a legal
    output name near 255 bytes) is cut and made unique again with a hash of the full name."""
    name = dest.name
    if len(f".{name}.tmp-".encode()) > NAME_MAX - _TMP_ROOM:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
        cut = os.fsencode(name)[: NAME_MAX - _TMP_ROOM - 32].decode("utf-8", "ignore")
        name = f"{cut}~{digest}"
    return f".{name}.tmp-"


def temp_path(dest: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name beside ``dest`` (``.NAME.tmp-PID-RANDOM`` + ``suffix``): a later run
    clears it (clear_stale_temps) when the process that made it is gone."""
    dest = Path(dest)
    return dest.with_name(f"{_tmp_prefix(dest)}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


_tmp_name = temp_path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clear_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders an earlier run left beside ``dest`` when it was
    killed (``.NAME.tmp-PID-*`` whose process no longer exists); returns what was removed."""
    dest = Path(dest)
    prefix = _tmp_prefix(dest)
    pattern = re.compile(r"(\d+)-[0-9a-f]{8}(\.[^/]*)?")
    removed = []
    try:
        entries = list(os.scandir(dest.parent if str(dest.parent) else "."))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        m = pattern.fullmatch(e.name[len(prefix):])
        if m is None or _alive(int(m.group(1))):
            continue
        p = Path(e.path)
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same path, or one lies inside the other (through links)."""
    ra, rb = a.resolve(), b.resolve()
    if ra == rb or rb in ra.parents or ra in rb.parents:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(dest: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 work: Iterable[str | os.PathLike] = (), file: bool = False) -> Path:
    """Refuse an output that already exists (unless overwrite) or that is, contains or lies inside
    one of the inputs (through links); the same for the command's ``work`` (scratch, state)
    folders, which it creates and removes. ``file``: the command writes one file, so a path that
    names a folder (ends with a separator, or is an existing folder, even with overwrite) is
    refused. Clears this output's stale temporary files."""
    raw = os.fspath(dest)
    if not raw.strip() or Path(dest).name in ("", ".", ".."):
        raise OutputError(f"the output path {raw!r} names no file or folder; give it a name")
    if file and (raw.endswith(os.sep) or (os.altsep and raw.endswith(os.altsep)) or Path(dest).is_dir()):
        raise OutputError("names a folder, but this command writes one file: give a file name (inside it, if you meant the folder)", dest)
    dest = Path(dest)
    srcs = [Path(s) for s in inputs if s is not None]
    for src in srcs:
        if _overlaps(dest, src):
            raise OutputError(f"output path is (or contains, or is inside) the input {src}; refusing to overwrite an input", dest)
    for w in work:
        if w is None:
            continue
        for src in srcs:
            if _overlaps(Path(w), src):
                raise OutputError(f"the input {src} is, contains or lies inside the run's work folder {w}, which the "
                                  "run clears and removes; choose another output", dest)
    if dest.exists() and not overwrite:
        raise OutputError("already exists; pass --overwrite to replace it", dest)
    if not dest.parent.exists():
        raise OutputError(f"parent directory {dest.parent} does not exist", dest)
    clear_stale_temps(dest)
    if overwrite:
        _REPLACE_OK.add(_key(dest))
    else:
        _REPLACE_OK.discard(_key(dest))
    return dest


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_renameat2_fn = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with ``flags``: True when done, False when this system or filesystem lacks it
    (the caller falls back); any other failure raises OSError (FileExistsError for NOREPLACE)."""
    global _renameat2_fn
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = False
        _renameat2_fn = fn
    if not _renameat2_fn:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _place_new(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``, refusing (OutputError) when ``dest`` exists, atomically."""
    exists = OutputError("already exists (written meanwhile by another run?); pass --overwrite to replace it", dest)
    try:
        if _renameat2(tmp, dest, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise exists from None
    if tmp.is_dir():  # claim the name with an empty folder (mkdir is atomic), then rename over it
        try:
            os.mkdir(dest)
        except FileExistsError:
            raise exists from None
        try:
            os.rename(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(dest)
            raise
        return
    try:
        os.link(tmp, dest)  # fails when dest exists
    except FileExistsError:
        raise exists from None
    except OSError:  # no hard links on this filesystem: the check-then-rename of old
        if dest.exists() or dest.is_symlink():
            raise exists from None
        os.rename(tmp, dest)
        return
    tmp.unlink()


def _publish(tmp: Path, dest: Path, replace: bool | None = None) -> None:
    """Move the complete ``tmp`` to ``dest``. ``replace`` (default: whether check_output allowed
    it for ``dest``): swap out an existing ``dest`` and remove it; else refuse one."""
    if replace is None:
        replace = _key(dest) in _REPLACE_OK
    if not replace:
        _place_new(tmp, dest)
    elif dest.exists() or dest.is_symlink():
        if not dest.is_symlink() and dest.is_dir() != tmp.is_dir():  # never swap a folder for a file (or back)
            raise OutputError("is a folder; a file output does not replace it" if dest.is_dir()
                              else "is a file; a folder output does not replace it", dest)
        try:
            swapped = _renameat2(tmp, dest, _RENAME_EXCHANGE)
        except FileNotFoundError:  # dest went away meanwhile
            swapped = False
        if swapped:
            _remove(tmp)  # tmp now holds the previous output
        else:
            old = temp_path(dest)
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)  # put the previous output back
                raise
            _remove(old)
    else:
        os.replace(tmp, dest)
    with contextlib.suppress(OSError):
        fsync_path(dest.parent)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, check: Callable[[Path], None] | None = None,
                replace: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success it is fsynced, ``check(tmp)`` runs (a failure leaves
    ``dest`` as it was) and it is renamed to ``dest`` (see _publish for ``replace``)."""
    dest = Path(dest)
    tmp = temp_path(dest)
    try:
        yield tmp
        fsync_path(tmp)
        if check is not None:
            check(tmp)
        _publish(tmp, dest, replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, check: Callable[[Path], None] | None = None,
               replace: bool | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success its files are fsynced, ``check(tmp)`` runs
    and it is renamed to ``dest`` (replacing an existing ``dest`` only after the new one is
    complete, and only where allowed: see _publish)."""
    dest = Path(dest)
    tmp = temp_path(dest)
    try:
        tmp.mkdir()
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        if check is not None:
            check(tmp)
        _publish(tmp, dest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def check_space(dest: str | os.PathLike, needed: int, what: str = "the output") -> None:
    """Refuse early when the destination's filesystem lacks room for ``needed`` bytes (+5%)."""
    dest = Path(dest)
    parent = dest.parent if not dest.is_dir() else dest
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    want = int(needed * 1.05) + 16 * 1024**2
    if free < want:
        raise OutputError(f"not enough disk space for {what}: about {want / 1e9:.2f} GB needed, "
                          f"{free / 1e9:.2f} GB free on {parent}", dest)


class BackgroundSync:
    """Flush written data to disk while the writing goes on: a thread calls ``fdatasync`` on the
    added files every ``interval`` seconds, so the final fsync of an output (atomic_file / atomic_dir)
    finds little left to write instead of the whole file. Each file is synced through its own
    duplicate descriptor (closing the original is harmless); ``close()`` stops and joins the
    thread and closes the duplicates, on every exit path (use it as a context manager)."""

    def __init__(self, interval: float = 0.25):
        import threading

        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="loratools-sync", daemon=True)
        self._thread.start()

    def add(self, fd: int) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._fds.append(os.dup(fd))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                fds = list(self._fds)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.fdatasync(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "BackgroundSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
