"""Atomic outputs: everything is written under a temporary name beside the destination,
fsynced, then renamed into place. An interrupted write leaves nothing at the destination."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_output(dest: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Refuse an output that already exists (unless overwrite) or that is one of the inputs."""
    if not os.fspath(dest).strip() or Path(dest).name in ("", ".", ".."):
        raise OutputError(f"the output path {os.fspath(dest)!r} names no file or folder; give it a name")
    dest = Path(dest)
    real = dest.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if real == s or s in real.parents or real in s.parents:
            raise OutputError(f"output path is (or contains, or is inside) the input {src}; refusing to overwrite an input", dest)
    if dest.exists() and not overwrite:
        raise OutputError("already exists; pass --overwrite to replace it", dest)
    if not dest.parent.exists():
        raise OutputError(f"parent directory {dest.parent} does not exist", dest)
    return dest


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        old = _tmp_name(dest)
        os.replace(dest, old)
        os.replace(tmp, dest)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, dest)
    with contextlib.suppress(OSError):
        fsync_path(dest.parent)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it is fsynced and renamed to ``dest``."""
    dest = Path(dest)
    tmp = _tmp_name(dest)
    try:
        yield tmp
        fsync_path(tmp)
        _replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success its files are fsynced and it is renamed
    to ``dest`` (replacing an existing ``dest`` only after the new one is complete)."""
    dest = Path(dest)
    tmp = _tmp_name(dest)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        _replace(tmp, dest)
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
