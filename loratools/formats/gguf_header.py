"""The one reader of a GGUF file's fixed header: magic, version, byte order, tensor and key-value
counts, checked against the file's size before anything else is parsed (gguf-py's reader, our
key-value reader and validate all start here)."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

HEADER_BYTES = 24  # magic, uint32 version, uint64 n_tensors, uint64 n_kv
VERSIONS = (2, 3)


@dataclass(frozen=True)
class GGUFHeader:
    endian: str      # "<" or ">" (struct prefix)
    version: int
    n_tensors: int
    n_kv: int
    size: int        # the file's size in bytes


def parse_header(head: bytes, size: int, path: str | os.PathLike) -> GGUFHeader:
    """``head``: the file's first bytes (at least 24 when the file has them); ``size``: its size."""
    if len(head) < HEADER_BYTES:
        raise InputError(f"truncated GGUF file ({size} bytes; the header alone takes {HEADER_BYTES})", path)
    if head[:4] != b"GGUF":
        raise InputError(f"not a GGUF file (bad magic {bytes(head[:4])!r})", path)
    end = "<" if struct.unpack_from("<I", head, 4)[0] < 0x10000 else ">"
    version, n_tensors, n_kv = struct.unpack_from(end + "IQQ", head, 4)
    if version not in VERSIONS:
        raise InputError(f"unsupported GGUF version {version} (2 and 3 are read)", path)
    # a tensor info takes at least 8 + 1 + 4 + 8 + 4 + 8 bytes, a key-value at least 8 + 1 + 4 + 1
    room = size - HEADER_BYTES
    if n_tensors * 33 > room or n_kv * 14 > room or n_tensors * 33 + n_kv * 14 > room:
        raise InputError(f"corrupt GGUF header: it claims {n_tensors} tensors and {n_kv} key-values, more than "
                         f"a {size}-byte file can hold", path)
    return GGUFHeader(end, version, n_tensors, n_kv, size)


def read_header(path: str | os.PathLike) -> GGUFHeader:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror}", path) from None
    return parse_header(head, size, path)
