"""Hugging Face checkpoints, read lazily tensor by tensor and written as atomic shards.

A checkpoint is a folder with config.json and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (pickle ``*.bin``/``*.pt`` only with ``allow_pickle``).
Only headers are read on open; ``get(name)`` reads one tensor (a positioned read into its own buffer).
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from . import readpolicy, st
from .errors import InputError, LoratoolsError, UnsupportedError
from .fsutil import BackgroundSync, atomic_dir

# Files carried from a source checkpoint to a written one (besides weights).
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_MAX_SHARD = 2 * 1024**3


def read_json(path: str | os.PathLike, what: str = "JSON") -> dict:
    """A JSON object from a model or adapter folder, read under the read policy (readpolicy.py)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"missing {what}", path)
    data = readpolicy.read_json(path, what=what)
    if not isinstance(data, dict):
        raise InputError(f"malformed {what}: expected a JSON object", path)
    return data


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '100KiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.I)
    if not m:
        raise LoratoolsError(f"cannot parse size {text!r} (use e.g. 2GB, 500MB)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** "_KMGT".index(unit or "_"))


def _inside(root: Path, rel: str, index_path: Path) -> Path:
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise InputError(f"weight_map names an absolute path {rel!r}; shards must be inside the checkpoint", index_path)
    p = (root / rel)
    try:
        real = p.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL byte, symlink loop
        raise InputError(f"weight_map entry {rel!r} is not a usable path ({e})", index_path) from e
    rroot = root.resolve()
    # A Hugging Face cache snapshot (<repo>/snapshots/<rev>/x -> <repo>/blobs/<hash>) is the one
    # layout whose links legitimately leave the folder; anything else outside it is refused.
    hf_cache = (rroot.parent.name == "snapshots" and real.parent.name == "blobs"
                and real.parent.parent == rroot.parent.parent and ".." not in Path(rel).parts)
    if rroot not in real.parents and not hf_cache:
        raise InputError(f"weight_map entry {rel!r} points outside the checkpoint directory", index_path)
    return p


def torch_load_reason(e: Exception) -> str:
    """One readable line out of torch.load's (multi-line, ANSI-coloured) failure message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it holds a non-tensor object ({m.group(1)})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


class _PickleShard:
    """A pickle checkpoint file loaded with torch.load(weights_only=True)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # mmap needs the zip format; legacy (_use_new_zipfile_serialization=False) files load without it
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # noqa: BLE001 - any failure to unpickle safely is a clear refusal
            raise InputError(f"cannot load pickle checkpoint with weights_only=True: {torch_load_reason(e)}", path) from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise InputError("pickle file does not hold a flat dict of tensors", path)
        self._sd = sd
        self.tensors = {k: st.TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in sd.items()}

    def keys(self):
        return list(self._sd)

    def get(self, name):
        return self._sd[name].clone()

    def close(self):
        pass


@dataclass
class Checkpoint:
    """Lazy view of a checkpoint: config, tensor names, shapes and dtypes without loading data."""

    path: Path
    config: dict
    shards: list[Path]
    index: dict[str, Path]  # tensor name -> shard path
    _open: dict = field(default_factory=dict, repr=False)
    _infos: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, allow_pickle: bool = False, require_config: bool = True) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise InputError("no such file or directory", path)
        if path.is_file():
            root, files = path.parent, [path]
        else:
            root, files = path, None
        config: dict = {}
        cfg = root / "config.json"
        if cfg.exists():
            config = read_json(cfg, "config.json")
        elif require_config and path.is_dir():
            if (path / "adapter_config.json").exists():
                raise InputError("this is an adapter (adapter_config.json), not a model checkpoint", path)
            raise InputError("not a Hugging Face checkpoint: no config.json", path)
        ckpt = cls(path=path, config=config, shards=[], index={})
        if files is None:
            files = ckpt._find_weight_files(root, allow_pickle)
        elif path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise UnsupportedError(_pickle_refusal(), path)
        elif path.suffix not in PICKLE_SUFFIXES and path.suffix != ".safetensors":
            raise InputError("not a checkpoint: expected a .safetensors file or a checkpoint folder", path)
        if not ckpt.index:
            for f in files:
                shard = ckpt._shard(f)
                for name in shard.keys():
                    if name in ckpt.index:
                        raise InputError(f"tensor {name!r} appears in two shards ({ckpt.index[name].name} and {f.name})", f)
                    ckpt.index[name] = f
        ckpt.shards = sorted(dict.fromkeys(files))
        for name, f in ckpt.index.items():
            ckpt._infos[name] = ckpt._shard(f).tensors[name]
        return ckpt

    def _find_weight_files(self, root: Path, allow_pickle: bool) -> list[Path]:
        idx = root / "model.safetensors.index.json"
        if idx.exists():
            data = read_json(idx, "safetensors index")
            wm = data.get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
                raise InputError("malformed index: 'weight_map' must map tensor names to shard file names", idx)
            files: dict[str, Path] = {}
            for rel in wm.values():
                if rel not in files:
                    p = _inside(root, rel, idx)
                    if not p.is_file():
                        raise InputError(f"shard {rel!r} listed in the index is missing", idx)
                    files[rel] = p
            for name, rel in wm.items():
                shard = self._shard(files[rel])
                if name not in shard.tensors:
                    raise InputError(f"index maps {name!r} to {rel} but that shard does not contain it", idx)
                self.index[name] = files[rel]
            seen: dict[str, str] = {}
            for rel, p in files.items():
                for name in self._shard(p).keys():
                    if name in seen and seen[name] != rel:
                        raise InputError(f"tensor {name!r} appears in two shards ({seen[name]} and {rel})", idx)
                    seen[name] = rel
            return sorted(files.values())
        single = root / "model.safetensors"
        if single.exists():
            return [single]
        found = sorted(root.glob("*.safetensors"))
        found = [f for f in found if f.name != "adapter_model.safetensors"]
        if found:
            return found
        pickles = sorted(p for s in PICKLE_SUFFIXES for p in root.glob(f"*{s}")
                         if p.name not in ("training_args.bin", "adapter_model.bin"))
        if pickles:
            if not allow_pickle:
                raise UnsupportedError(_pickle_refusal(), pickles[0])
            return pickles
        raise InputError("not a checkpoint: no model.safetensors, index or *.safetensors files", root)

    def _shard(self, f: Path):
        s = self._open.get(f)
        if s is None:
            s = _PickleShard(f) if f.suffix in PICKLE_SUFFIXES else st.SafetensorsFile(f)
            self._open[f] = s
        return s

    # -- lazy access -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def info(self, name: str) -> st.TensorInfo:
        return self._infos[name]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.index:
            raise InputError(f"tensor {name!r} not found", self.path)
        t = self._shard(self.index[name]).get(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def safetensors_file(self, name: str) -> "st.SafetensorsFile | None":
        """The open safetensors shard holding ``name`` (None for pickle shards)."""
        s = self._shard(self.index[name])
        return s if isinstance(s, st.SafetensorsFile) else None

    def get_mapped(self, name: str) -> torch.Tensor:
        """Like get(), but without a copy when the shard is safetensors (a copy-on-write map)."""
        f = self.safetensors_file(name)
        return f.mapped(name) if f is not None else self.get(name)

    def by_shard(self) -> Iterator[tuple[Path, list[str]]]:
        for f in self.shards:
            yield f, [n for n, s in self.index.items() if s == f]

    @property
    def root(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self._infos.values():
            k = st.DTYPE_NAMES.get(i.dtype, str(i.dtype))
            out[k] = out.get(k, 0) + i.numel
        return out

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pickle_refusal() -> str:
    return ("pickle checkpoint refused: unpickling can run arbitrary code. Convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)")


def plan_shards(specs: list[st.TensorInfo], max_shard_size: int) -> list[list[st.TensorInfo]]:
    shards: list[list[st.TensorInfo]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class CheckpointWriter:
    """Write a sharded safetensors checkpoint atomically.

    The manifest (name, dtype, shape of every tensor, in order) is known up front, so shard
    boundaries and offsets are planned first and each tensor is written where it belongs as soon
    as it is produced: memory stays at one tensor. Use as a context manager; the folder appears
    at ``out_dir`` only when ``__exit__`` runs without an exception.
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Iterable[st.TensorInfo],
                 max_shard_size: int | str = DEFAULT_MAX_SHARD, aux_from: str | os.PathLike | None = None,
                 config: Mapping | None = None, prefix: str = "model"):
        self.out_dir = Path(out_dir)
        self.specs = list(specs)
        self.max_shard_size = parse_size(max_shard_size)
        self.aux_from = Path(aux_from) if aux_from else None
        self.config = dict(config) if config is not None else None
        self.prefix = prefix
        self._ctx = None

    def __enter__(self) -> "CheckpointWriter":
        self._writers: dict[str, st.SafetensorsWriter] = {}
        self.weight_map: dict[str, str] = {}
        self._shard_writers: list[st.SafetensorsWriter] = []
        self._sync = None
        self._ctx = atomic_dir(self.out_dir)
        self.tmp = self._ctx.__enter__()
        try:  # from here on a signal (Terminated) or an error removes the temporary folder
            groups = plan_shards(self.specs, self.max_shard_size)
            n = len(groups)
            self._sync = BackgroundSync()  # the shards reach the disk while they are written
            for i, g in enumerate(groups):
                fname = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
                w = st.SafetensorsWriter(self.tmp / fname, g, {"format": "pt"})
                self._shard_writers.append(w)
                self._sync.add(w._f.sync_fd())
                for s in g:
                    self._writers[s.name] = w
                    self.weight_map[s.name] = fname
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writers[name].write(name, tensor)

    def file_order(self, specs: list[st.TensorInfo]) -> list[st.TensorInfo]:
        """``specs`` in the order their bytes lie in the shards (shard by shard, by offset): produced
        in this order, every shard is written front to back (large sequential, direct writes)."""
        rank = {n: (i, j) for i, w in enumerate(self._shard_writers) for j, n in enumerate(w.file_order())}
        return sorted(specs, key=lambda s: rank[s.name])

    def write_part(self, name: str, index: int, part: torch.Tensor) -> None:
        """Write slab ``index`` (along the first dim) of tensor ``name``: a 3-D expert stack one
        expert at a time."""
        self._writers[name].write_part(name, index, part)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start:start + len(rows)`` of tensor ``name`` (a large tensor in row blocks)."""
        self._writers[name].write_rows(name, start, rows)

    def copy_from(self, name: str, ck: "Checkpoint", src_name: str | None = None) -> bool:
        """Copy an unchanged tensor's bytes from ``ck`` (no tensor in memory). False when the
        source is not a safetensors shard or differs in dtype/shape (then write() it instead)."""
        src_name = src_name or name
        f = ck.safetensors_file(src_name)
        w = self._writers[name]
        if f is None or (f.tensors[src_name].dtype, f.tensors[src_name].shape) != (w.placed[name].dtype, w.placed[name].shape):
            return False
        w.copy_raw(name, f, src_name)
        return True

    def __exit__(self, et, ev, tb):
        try:
            if self._sync is not None:
                self._sync.close()
            if et is None:
                for w in self._shard_writers:
                    w.close()
                if len(self._shard_writers) > 1:
                    index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                             "weight_map": dict(sorted(self.weight_map.items()))}
                    (self.tmp / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
                copy_aux_files(self.aux_from, self.tmp)
                if self.config is not None:
                    (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
            else:
                for w in self._shard_writers:
                    w.abort()
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        return self._ctx.__exit__(et, ev, tb)


def copy_aux_files(src: Path | None, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer files and chat template from ``src``."""
    copied = []
    if src is None:
        return copied
    root = src if src.is_dir() else src.parent
    for name in AUX_FILES:
        p = root / name
        if p.exists() or p.is_symlink():
            readpolicy.copy_side_file(p, dst / name, root)
            copied.append(name)
    return copied


def write_checkpoint(out_dir: str | os.PathLike, specs: Iterable[st.TensorInfo],
                     produce: Callable[[st.TensorInfo], torch.Tensor], **kw) -> Path:
    """Stream ``produce(spec)`` for every spec into a new sharded checkpoint at ``out_dir``."""
    specs = list(specs)
    with CheckpointWriter(out_dir, specs, **kw) as w:
        for s in specs:
            w.write(s.name, produce(s))
    return Path(out_dir)


def save_state_dict(out_dir: str | os.PathLike, tensors: Mapping[str, torch.Tensor], **kw) -> Path:
    specs = [st.TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return write_checkpoint(out_dir, specs, lambda s: tensors[s.name], **kw)
