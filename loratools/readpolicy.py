"""The one policy for reading a file out of a model or adapter folder (config.json, tokenizer
files, chat templates, generation_config.json, side files carried into an output).

A file is read only when it is a regular file whose real path lies inside the folder it was
found in (links between files of the folder are fine), or inside the same repository's
``blobs/`` folder of a Hugging Face cache snapshot (``<repo>/snapshots/<rev>/f ->
../../blobs/<hash>``). Its size is checked against a cap before a byte is read, and it is
opened without following a link and without blocking, so a FIFO, a device, /dev/zero or a link
to a file elsewhere on the machine is refused with one line naming the file, never read.

JSON from these files is parsed with the integer length bounded (Python's own limit of 4,300
digits raises a ValueError deep inside ``json.loads``) and nesting errors turned into the same
one-line refusal.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from .errors import InputError

MiB = 1024 * 1024
JSON_CAP = 64 * MiB          # config.json, adapter_config.json, an index of a huge checkpoint
TOKENIZER_CAP = 512 * MiB    # tokenizer.json, tokenizer.model, vocab/merges files
TEMPLATE_CAP = 4 * MiB       # a chat template (real ones are a few KB)
SIDE_FILE_CAP = 512 * MiB    # any other side file carried into an output
MAX_INT_DIGITS = 100         # no config value needs more (a uint64 has 20)


def _real_inside(path: Path, root: Path) -> Path:
    """The real path of ``path``, refused unless it lies inside ``root`` (or the HF cache layout)."""
    try:
        real = path.resolve(strict=True)
        rroot = root.resolve(strict=True)
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except (OSError, RuntimeError, ValueError) as e:  # a link loop, a NUL byte
        raise InputError(f"not a usable path ({e})", path) from None
    if rroot in real.parents:
        return real
    hf_cache = (rroot.parent.name == "snapshots" and real.parent.name == "blobs"
                and real.parent.parent == rroot.parent.parent)
    if hf_cache:
        return real
    raise InputError(f"is a link to {real}, outside the folder {root}; refusing to read it", path)


def open_model_file(path: str | os.PathLike, root: str | os.PathLike | None = None,
                    cap: int = JSON_CAP) -> tuple[int, int]:
    """Check ``path`` against the policy and open it: (file descriptor, size in bytes)."""
    path = Path(path)
    real = _real_inside(path, Path(root) if root is not None else path.parent)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror or e}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError("not a regular file (a device, FIFO or socket); refusing to read it", path)
        if st.st_size > cap:
            raise InputError(f"is {st.st_size} bytes, more than the {cap} bytes such a file may have", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_bytes(path: str | os.PathLike, root: str | os.PathLike | None = None, cap: int = JSON_CAP) -> bytes:
    fd, size = open_model_file(path, root, cap)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)  # a file that grew after the check still stops at the cap
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path) from None
    finally:
        os.close(fd)
    if len(data) > cap:
        raise InputError(f"is more than the {cap} bytes such a file may have", path)
    return data


def read_text(path: str | os.PathLike, root: str | os.PathLike | None = None, cap: int = JSON_CAP,
              encoding: str = "utf-8") -> str:
    data = read_bytes(path, root, cap)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {len(text.lstrip('-'))} digits (more than {MAX_INT_DIGITS})")
    return int(text)


def loads_json(text: str | bytes, path: str | os.PathLike | None = None, what: str = "JSON") -> Any:
    """``json.loads`` with bounded integers; every failure is one InputError line."""
    try:
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
    except RecursionError:
        raise InputError(f"malformed {what}: nested too deeply", path) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"malformed {what}: {e}", path) from None


def read_json(path: str | os.PathLike, root: str | os.PathLike | None = None, cap: int = JSON_CAP,
              what: str = "JSON") -> Any:
    return loads_json(read_text(path, root, cap), path, what)


def copy_side_file(src: str | os.PathLike, dst: str | os.PathLike, root: str | os.PathLike | None = None,
                   cap: int = SIDE_FILE_CAP) -> None:
    """Copy one side file of a model folder into an output, under the read policy."""
    fd, _ = open_model_file(src, root, cap)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f, open(dst, "wb") as out:
            shutil.copyfileobj(f, out)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", src) from None
    finally:
        os.close(fd)


def load_tokenizer(path: str | os.PathLike, root: str | os.PathLike | None = None):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json, read under the policy."""
    from tokenizers import Tokenizer

    text = read_text(path, root, TOKENIZER_CAP)
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise InputError(f"the tokenizers library cannot load it: {' '.join(str(e).split())[:300]}", path) from None
