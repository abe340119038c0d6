"""The safetensors format, read and written tensor by tensor.

Layout: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the data region; offsets are relative to its start. The reader validates the whole
header before touching data (so a hostile file gets a clear error, not an allocation), then
reads one tensor at a time with a positioned read straight into the tensor's own buffer (no
mapping is kept, so neither anonymous nor resident memory grows past that tensor). The writer
plans every tensor's offset from a manifest, writes the header first and then each tensor at
its offset as it arrives, so a writer never holds more than the tensor it is given.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .errors import InputError, LoratoolsError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


MAX_DIM = 2**40       # no real tensor dimension comes near; torch's sizes are int64
MAX_RANK = 16


def check_dims(shape, what: str, path) -> None:
    """Refuse a shape no tensor can have: too many dimensions, a dimension past MAX_DIM, or an
    element count past int64 (a zero-size tensor with a huge dimension included)."""
    if len(shape) > MAX_RANK:
        raise InputError(f"{what} has {len(shape)} dimensions (at most {MAX_RANK})", path)
    big = [d for d in shape if d > MAX_DIM]
    if big:
        raise InputError(f"{what} has a dimension of {big[0]} (more than {MAX_DIM})", path)
    if math.prod(d for d in shape if d) >= 2**62:
        raise InputError(f"{what} has shape {list(shape)}, more elements than a tensor can hold", path)


def _header_int(text: str) -> int:
    if len(text) > 30:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (tensors, metadata, data_start)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"truncated safetensors file ({size} bytes; it must start with an 8-byte header length)", path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise InputError(f"corrupt safetensors header: it claims {n} header bytes (limit {MAX_HEADER})", path)
            if n > size - 8:
                raise InputError(f"truncated or corrupt safetensors file: header claims {n} bytes but the file has {size - 8} after the length", path)
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path) from e
    try:
        header = json.loads(raw.decode("utf-8"), parse_int=_header_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"corrupt safetensors header: invalid JSON ({e})", path) from e
    except (ValueError, RecursionError) as e:  # an integer too long, nesting too deep
        raise InputError(f"corrupt safetensors header: {e if isinstance(e, ValueError) else 'nested too deeply'}", path) from None
    if not isinstance(header, dict):
        raise InputError("corrupt safetensors header: not a JSON object", path)
    data_start = 8 + n
    data_len = size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError("corrupt safetensors header: __metadata__ must map strings to strings", path)
    infos: dict[str, TensorInfo] = {}
    for name, ent in header.items():
        if not isinstance(ent, dict):
            raise InputError(f"corrupt safetensors header: entry {name!r} is not an object", path)
        dt, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise InputError(f"tensor {name!r} has unknown or unsupported dtype {dt!r}", path)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InputError(f"tensor {name!r} has an invalid shape {str(shape)[:200]}", path)
        check_dims(shape, f"tensor {name!r}", path)
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise InputError(f"tensor {name!r} has invalid data_offsets {offs!r}", path)
        b, e = offs
        if not 0 <= b <= e:
            raise InputError(f"tensor {name!r} has invalid data_offsets {offs!r}", path)
        if e > data_len:
            raise InputError(f"truncated or corrupt: tensor {name!r} ends at byte {e} of the data but the data region has {data_len} bytes", path)
        info = TensorInfo(name, DTYPES[dt], tuple(shape), b, e)
        if info.nbytes != e - b:
            raise InputError(f"tensor {name!r}: shape {shape} of {dt} needs {info.nbytes} bytes but its offsets span {e - b}", path)
        infos[name] = info
    prev_end, prev = 0, None
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin < prev_end and info.end > info.begin:
            raise InputError(f"corrupt: tensors {prev!r} and {info.name!r} overlap in the data region", path)
        if info.end > info.begin:
            prev_end, prev = info.end, info.name
    return infos, meta, data_start


class SafetensorsFile:
    """A validated safetensors file; ``get`` reads one tensor into its own buffer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata, self._data_start = read_header(self.path)
        self._file = None

    def _fh(self):
        if self._file is None:
            self._file = open(self.path, "rb")
        return self._file

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor straight into its own buffer (positioned read, no mapping kept)."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = os.preadv(self._fh().fileno(), [view], self._data_start + info.begin)
            if got != info.nbytes:
                raise InputError(f"truncated while reading tensor {name!r} ({got} of {info.nbytes} bytes)", self.path)
        return out

    def location(self, name: str) -> tuple[int, int]:
        """(absolute byte offset, byte count) of a tensor's data in the file."""
        info = self.tensors[name]
        return self._data_start + info.begin, info.nbytes

    def will_need(self, name: str) -> None:
        """Ask the kernel to read a tensor's bytes ahead (asynchronously), for the next step."""
        off, n = self.location(name)
        if n and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fh().fileno(), off, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def mapped(self, name: str) -> torch.Tensor:
        """A tensor backed by a private copy-on-write map of the file: no copy, its pages are
        file-backed (the kernel can drop and re-read them), writes never reach the file. For
        frozen weights that are used as stored (training, inference)."""
        import mmap

        info = self.tensors[name]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        if getattr(self, "_mm", None) is None:
            self._mm = mmap.mmap(self._fh().fileno(), 0, access=mmap.ACCESS_COPY)
        start = self._data_start + info.begin
        flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=start)
        return flat.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        # never close the map: tensors from mapped() hold a reference to it and it is unmapped
        # when the last of them is gone
        self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def plan_header(specs: Iterable[TensorInfo], metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, TensorInfo]]:
    """Lay out tensors in the given order; return the encoded header (length prefix included,
    padded to 8 bytes) and the placed infos."""
    placed: dict[str, TensorInfo] = {}
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    # Larger element sizes first: with the 8-byte-aligned header every tensor then starts at a
    # multiple of its element size, and the data has no holes (the format forbids them).
    for s in sorted(specs, key=lambda x: -itemsize(x.dtype)):
        if s.name in placed:
            raise LoratoolsError(f"tensor {s.name!r} listed twice")
        info = TensorInfo(s.name, s.dtype, tuple(s.shape), off, off + s.nbytes)
        placed[s.name] = info
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [info.begin, info.end]}
        off = info.end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, placed


class SafetensorsWriter:
    """Write one safetensors file from a manifest; tensors may arrive in any order."""

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorInfo], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        head, self.placed = plan_header(specs, metadata)
        self._data_start = len(head)
        self._pending = set(self.placed)
        self._parts: dict[str, set] = {}
        from .fsutil import SeqFile

        self._f = SeqFile(self.path)  # written front to back when tensors come in file order (direct I/O)
        self._f.write(head)
        self._f.truncate(self._data_start + sum(i.nbytes for i in self.placed.values()))

    def file_order(self) -> list[str]:
        """The planned tensors in the order of their bytes in the file: written in this order, the
        file is one sequential stream."""
        return sorted(self.placed, key=lambda n: self.placed[n].begin)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self.placed.get(name)
        if info is None or name not in self._pending:
            raise LoratoolsError(f"{self.path}: tensor {name!r} not expected (or written twice)")
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise LoratoolsError(f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {info.shape} {info.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        if info.nbytes:
            self._f.pwrite(memoryview(t.view(-1).view(torch.uint8).numpy()), self._data_start + info.begin)
        self._pending.discard(name)

    def write_part(self, name: str, index: int, part: torch.Tensor) -> None:
        """Write ``tensor[index]`` (one slab along the first dim) of a planned tensor: rows
        ``index:index + 1``; the tensor counts as written once every index has been."""
        info = self.placed.get(name)
        if info is not None and (not info.shape or tuple(part.shape) != info.shape[1:]):
            raise LoratoolsError(f"{self.path}: part {index} of tensor {name!r} is {tuple(part.shape)} {part.dtype}, "
                                 f"planned {info.shape} {info.dtype}")
        self.write_rows(name, index, part.unsqueeze(0))

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start:start + len(rows)`` (along the first dim) of a planned tensor: a large
        tensor a block of rows at a time; it counts as written once every row has been (each once)."""
        info = self.placed.get(name)
        if info is None or name not in self._pending:
            raise LoratoolsError(f"{self.path}: tensor {name!r} not expected (or written twice)")
        n = rows.shape[0] if rows.dim() else 0
        if not info.shape or tuple(rows.shape[1:]) != info.shape[1:] or rows.dtype != info.dtype or \
                not 0 <= start < start + n <= info.shape[0]:
            raise LoratoolsError(f"{self.path}: rows {start}:{start + n} of tensor {name!r} are {tuple(rows.shape)} "
                                 f"{rows.dtype}, planned {info.shape} {info.dtype}")
        done = self._parts.setdefault(name, set())
        if done.intersection(range(start, start + n)):
            raise LoratoolsError(f"{self.path}: rows of tensor {name!r} written twice")
        t = rows.detach().to("cpu").contiguous()
        step = info.nbytes // info.shape[0]
        if step:
            self._f.pwrite(memoryview(t.view(-1).view(torch.uint8).numpy()), self._data_start + info.begin + start * step)
        done.update(range(start, start + n))
        if len(done) == info.shape[0]:
            self._pending.discard(name)

    def copy_raw(self, name: str, src: "SafetensorsFile", src_name: str | None = None) -> None:
        """Copy a tensor's bytes from another safetensors file unchanged (same dtype and shape),
        in chunks, without materializing the tensor."""
        src_name = src_name or name
        info, sinfo = self.placed.get(name), src.tensors[src_name]
        if info is None or name not in self._pending:
            raise LoratoolsError(f"{self.path}: tensor {name!r} not expected (or written twice)")
        if (sinfo.shape, sinfo.dtype) != (info.shape, info.dtype):
            raise LoratoolsError(f"{self.path}: tensor {name!r} is {sinfo.shape} {sinfo.dtype}, planned {info.shape} {info.dtype}")
        off, n = src.location(src_name)
        try:
            self._f.copy_range(src._fh().fileno(), off, n, self._data_start + info.begin)
        except EOFError:
            raise InputError(f"truncated while copying tensor {src_name!r}", src.path) from None
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            self._f.abort()
            raise LoratoolsError(f"{self.path}: tensors never written: {sorted(self._pending)[:5]}")
        self._f.close()  # fsync and rename belong to the atomic_file / atomic_dir around the writer

    def abort(self) -> None:
        """Stop writing (a failed run: the caller removes the file)."""
        self._f.abort()


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a dict of tensors to one safetensors file (not atomic by itself: use fsutil)."""
    specs = [TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    w = SafetensorsWriter(path, specs, {"format": "pt", **(metadata or {})})
    try:
        for k in w.file_order():  # front to back: the file is one sequential stream
            w.write(k, tensors[k])
    except BaseException:
        w.abort()
        raise
    w.close()


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.get(k) for k in f.keys()}
