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
import threading
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


# Large outputs go to the disk without the page cache where the filesystem allows it (O_DIRECT):
# a buffered write first takes a fresh page-cache page for every 4 KiB it writes, which on some
# machines (virtual machines that hand freed memory back to their host) costs more than the disk
# itself. DIRECT_IO = False (or LORATOOLS_DIRECT_IO=0) writes through the page cache everywhere.
DIRECT_IO = os.environ.get("LORATOOLS_DIRECT_IO", "1") != "0"
_ALIGN = 4096           # file offsets, lengths and buffer addresses of direct writes: any logical block size up to a page
_CHUNK = 8 << 20        # bytes staged before a direct write; two chunks per file in turn
_ZERO_GAP = 64 << 20    # a forward gap up to this is filled with zeros in direct mode (larger: buffered from there on)
_POOL: list = []        # free staging chunks (anonymous maps: page-aligned), reused from file to file
_POOL_LOCK = threading.Lock()


def _chunk():
    import mmap

    with _POOL_LOCK:
        if _POOL:
            return _POOL.pop()
    return mmap.mmap(-1, _CHUNK)


def _release(m) -> None:
    with _POOL_LOCK:
        if len(_POOL) < 4:
            _POOL.append(m)
            return
    m.close()


def _pwrite_all(fd: int, data, offset: int, path=None) -> None:
    """All of ``data`` at ``offset``; an error names ``path`` (a full disk: one line with the file)."""
    mv = memoryview(data).cast("B")
    try:
        while len(mv):
            n = os.pwrite(fd, mv, offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            mv, offset = mv[n:], offset + n
    except OSError as e:
        if path is None or e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


class SeqFile:
    """An output file written front to back (a header, then tensors in file order), with large
    sequential writes that reach the disk while the caller computes: the bytes are staged in
    aligned chunks and a thread writes each full chunk with O_DIRECT (no page cache) while the
    next one fills. Where direct I/O is refused (the filesystem, an alignment it rejects) or a
    write goes backwards, it turns into plain positioned writes through the page cache from that
    point on, after writing out what it staged: the file's bytes are the same either way.

    ``write`` / ``pwrite`` take any bytes-like object (a contiguous tensor's ``numpy()`` view);
    ``copy_range`` copies bytes of another file (unchanged tensors). ``close()`` writes the last
    chunk (padded to the alignment, then the file is cut to its size); ``abort()`` drops the rest.
    Neither fsyncs: that is atomic_file's / atomic_dir's, on the finished temporary file. There is
    no ``fileno()``: nothing may write to the descriptor behind the staged bytes' back."""

    def __init__(self, path: str | os.PathLike, direct: bool | None = None):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._dfd = None
        if (DIRECT_IO if direct is None else direct) and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):
                self._dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        self._pos = 0      # where the next sequential byte goes
        self._size = 0     # the file's length once closed
        self._base = 0     # file offset of the current chunk (a multiple of _ALIGN)
        self._fill = 0     # bytes staged in the current chunk
        self._bufs: list = []
        self._cur = 0
        self._pending: list = [None, None]
        self._pool = None
        self._refused = False  # set by the writer thread when a direct write was refused (EINVAL)
        self.closed = False

    @property
    def direct(self) -> bool:
        return self._dfd is not None

    def sync_fd(self) -> int:
        """A descriptor to fdatasync (BackgroundSync) — never to write through."""
        return self._fd

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        """Nothing to do: staged bytes are written by ``close()`` (a reader needs the closed file)."""

    # -- direct mode ---------------------------------------------------------------------------
    def _io(self, k: int, offset: int, n: int) -> None:
        mv = memoryview(self._bufs[k])[:n]
        if not self._refused:
            try:
                _pwrite_all(self._dfd, mv, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise OSError(e.errno, e.strerror, str(self.path)) from None
                self._refused = True  # this filesystem takes no direct writes: the page cache from now on
        _pwrite_all(self._fd, mv, offset, self.path)

    def _wait(self, k: int) -> None:
        f, self._pending[k] = self._pending[k], None
        if f is not None:
            f.result()

    def _submit(self, n: int) -> None:
        """Write the current chunk's first ``n`` bytes (``n`` a multiple of _ALIGN) at ``_base`` in
        the thread; the next chunk becomes current once its previous write is done."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="loratools-write")
        self._pending[self._cur] = self._pool.submit(self._io, self._cur, self._base, n)
        self._cur ^= 1
        self._wait(self._cur)
        if len(self._bufs) <= self._cur:
            self._bufs.append(_chunk())
        self._base += n
        self._fill = 0

    def _cur_buf(self):
        if not self._bufs:
            self._bufs.append(_chunk())
        return self._bufs[self._cur]

    def _stage(self, data) -> None:
        """Append ``data`` at ``_base + _fill``; when a direct write was refused meanwhile, the rest
        goes through the page cache (and direct mode ends)."""
        mv = memoryview(data).cast("B")
        while len(mv):
            k = min(len(mv), _CHUNK - self._fill)
            self._cur_buf()[self._fill:self._fill + k] = mv[:k]
            self._fill += k
            mv = mv[k:]
            if self._fill == _CHUNK:
                self._submit(_CHUNK)
                if self._refused:
                    self._to_buffered(mv)
                    return

    def _zeros(self, n: int) -> None:
        """``n`` zero bytes appended (a gap between tensors); refused meanwhile: the gap stays a hole."""
        while n and self._dfd is not None:
            k = min(n, _CHUNK - self._fill)
            self._cur_buf()[self._fill:self._fill + k] = bytes(k)
            self._fill += k
            n -= k
            if self._fill == _CHUNK:
                self._submit(_CHUNK)
                if self._refused:
                    self._to_buffered()

    def _drain(self) -> None:
        for k in (0, 1):
            self._wait(k)

    def _to_buffered(self, rest=b"") -> None:
        """Leave direct mode: the staged bytes and ``rest`` (which follows them) through the page cache."""
        self._drain()
        if self._fill:
            _pwrite_all(self._fd, memoryview(self._bufs[self._cur])[:self._fill], self._base, self.path)
        if len(rest):
            _pwrite_all(self._fd, rest, self._base + self._fill, self.path)
        self._close_direct()

    def _close_direct(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for b in self._bufs:
            _release(b)
        self._bufs = []
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None

    # -- the interface ---------------------------------------------------------------------------
    def _goto(self, offset: int) -> None:
        """Make ``offset`` the next byte: in direct mode a short forward gap is staged as zeros; a
        backwards or long jump ends direct mode."""
        if self._dfd is not None and (offset < self._pos or offset - self._pos > _ZERO_GAP):
            self._to_buffered()
        if self._dfd is not None and offset > self._pos:
            self._zeros(offset - self._pos)
        self._pos = offset
        self._size = max(self._size, offset)

    def pwrite(self, data, offset: int) -> None:
        self._goto(offset)
        if self._dfd is not None:
            self._stage(data)
        else:
            _pwrite_all(self._fd, data, offset, self.path)
        self._pos = offset + memoryview(data).nbytes
        self._size = max(self._size, self._pos)

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.pwrite(data, self._pos)
        return n

    def seek(self, offset: int) -> None:
        """The next ``write`` goes to ``offset`` (backwards: from then on through the page cache)."""
        self._goto(offset)

    def copy_range(self, src_fd: int, src_offset: int, n: int, offset: int) -> None:
        """``n`` bytes of ``src_fd`` from ``src_offset`` to ``offset`` here: read straight into the
        staged chunks in direct mode, else copied in the kernel (copy_file_range)."""
        self._goto(offset)
        done = 0
        while done < n and self._dfd is not None:
            k = min(n - done, _CHUNK - self._fill)
            got = os.preadv(src_fd, [memoryview(self._cur_buf())[self._fill:self._fill + k]], src_offset + done)
            if got <= 0:
                raise EOFError(f"{n - done} bytes missing")
            self._fill += got
            done += got
            self._pos += got
            if self._fill == _CHUNK:
                self._submit(_CHUNK)
                if self._refused:
                    self._to_buffered()
        self._size = max(self._size, self._pos)
        src_offset, offset, n = src_offset + done, offset + done, n - done
        done = 0
        while done < n:
            step = min(n - done, 64 << 20)
            try:
                k = os.copy_file_range(src_fd, self._fd, step, src_offset + done, offset + done)
            except OSError:
                k = os.pwrite(self._fd, os.pread(src_fd, min(step, 8 << 20), src_offset + done), offset + done)
            if k <= 0:
                raise EOFError(f"{n - done} bytes missing")
            done += k
        self._pos = offset + n
        self._size = max(self._size, self._pos)

    def truncate(self, size: int) -> None:
        """The file's length once closed (a sparse tail beyond what was written reads as zeros)."""
        self._size = size
        if self._dfd is None:
            os.ftruncate(self._fd, size)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._dfd is not None:
                if self._fill:
                    self._zeros(-self._fill % _ALIGN)  # the last chunk padded to the alignment, cut below
                    if self._fill:
                        self._submit(self._fill)
                self._drain()
                self._close_direct()
            os.ftruncate(self._fd, self._size)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        os.close(self._fd)

    def abort(self) -> None:
        """Stop without writing what is staged (the caller removes the file); waits for the thread."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._drain()
        with contextlib.suppress(Exception):
            self._close_direct()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> "SeqFile":
        return self

    def __exit__(self, et, ev, tb) -> None:
        self.close() if et is None else self.abort()
