"""llama.cpp's own quantizer (through llama-cpp-python) and importance matrices.

K-quants, i-quants and the legacy 4/5-bit types are made by ``llama_model_quantize`` from an
f32 GGUF that the streamed export writes beside the output: the per-tensor type choices (the
output layer — or a tied token_embd — at Q6_K/Q8_0, more bits for some attn_v / ffn_down
layers in the _M mixes, the fallbacks for rows that are not a multiple of 256) are then exactly
llama-quantize's, and so are the bytes.

An importance matrix is, per weight matrix, the mean of the squared input activations per input
column (per expert for a stacked expert tensor), as llama-imatrix collects it. Its file formats:

- GGUF (what llama-imatrix writes by default): ``general.type = "imatrix"``,
  ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32),
  and per weight ``NAME.in_sum2`` (F32, ne = [in, n_mat]: the sums of squares) and
  ``NAME.counts`` (F32, ne = [1, n_mat]: the activation rows summed, per expert);
- legacy ``.dat``: int32 entry count, then per entry int32 name length, name, int32 ncall, int32
  nval, nval float32 (mean × ncall), then optionally int32 chunk count and the dataset name.

The quantizer takes sums / count (1 where a count is 0), as llama-quantize's load_imatrix does.
Names are GGUF tensor names (``blk.0.attn_q.weight``, ``blk.3.ffn_down_exps.weight``).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IncompatibleError, InputError, LoratoolsError, UnsupportedError

# the outtypes loratools' own GGUF writer makes (formats/gguf_model.py): outtype -> GGML tensor type
WRITER_OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
                   "q5_0": "Q5_0", "q5_1": "Q5_1"}

# outtype -> llama.cpp file type (LLAMA_FTYPE_MOSTLY_*)
LLAMA_OUTTYPES = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
    "q2_k": "Q2_K", "q2_k_s": "Q2_K_S", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L",
    "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
    "iq4_xs": "IQ4_XS", "iq4_nl": "IQ4_NL", "iq3_s": "IQ3_S", "iq3_m": "IQ3_M",
    "iq3_xs": "IQ3_XS", "iq3_xxs": "IQ3_XXS", "iq2_m": "IQ2_M", "iq2_s": "IQ2_S", "iq2_xs": "IQ2_XS",
    "iq2_xxs": "IQ2_XXS", "iq1_m": "IQ1_M", "iq1_s": "IQ1_S",
}


def all_outtypes() -> list[str]:
    """Every ``export gguf --outtype``: the in-house writer's, then llama.cpp quantizer's."""
    return list(WRITER_OUTTYPES) + [t for t in LLAMA_OUTTYPES if t not in WRITER_OUTTYPES]


LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1")
# llama.cpp refuses these without an importance matrix (tensor_requires_imatrix in llama-quant.cpp:
# their tensors go to IQ1_*, IQ2_*, IQ3_XXS, or Q2_K in a Q2_K_S file)
NEEDS_IMATRIX = ("q2_k_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
INSTALL = "pip install 'loratools[llama]' (llama-cpp-python; see DEVELOPERS.md for the build flags)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require(outtype: str):
    try:
        import llama_cpp
    except ImportError:
        raise LoratoolsError(f"--outtype {outtype} is made by llama.cpp's quantizer, which needs llama-cpp-python: "
                             f"{INSTALL}") from None
    return llama_cpp


def ftype_of(outtype: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_OUTTYPES.get(outtype, outtype.upper())}"))


# -- the quantizer ---------------------------------------------------------------------------
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


@contextlib.contextmanager
def _log_to(sink):
    """Route llama.cpp's log lines to ``sink(level, text)`` (and back to llama-cpp-python's own
    callback afterwards)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        with contextlib.suppress(Exception):
            sink(int(level), text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield
    finally:
        try:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except ImportError:  # pragma: no cover - older layouts
            llama_cpp.llama_log_set(ctypes.cast(None, llama_cpp.llama_log_callback), ctypes.c_void_p(0))
        del cb


def quantize(src: str | os.PathLike, dest: str | os.PathLike, outtype: str, imatrix: dict | None = None,
             quiet: bool = True, nthread: int = 0) -> dict:
    """``llama_model_quantize(src → dest, outtype)``; ``imatrix``: GGUF name -> float32 values
    (normalized, as ``Imatrix.normalized`` gives them). A failure raises with llama.cpp's own reason."""
    llama_cpp = require(outtype)
    from tqdm import tqdm

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(outtype)
    params.nthread = nthread or max(1, os.cpu_count() or 1)
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            a = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(a)
            arr[i].name = name.encode()
            arr[i].data = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = a.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    bar = None
    errors: list[str] = []
    lines: list[str] = []

    def sink(level: int, text: str):
        nonlocal bar
        lines.append(text)
        if level == 3:  # GGML_LOG_LEVEL_ERROR
            errors.append(text)
        m = _PROGRESS.match(text)
        if m:
            if bar is None:
                bar = tqdm(total=int(m.group(2)), desc=f"quantize {outtype}", unit="tensor", leave=False,
                           disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
            bar.update(1)

    if not getattr(quantize, "_init", False):
        llama_cpp.llama_backend_init()
        quantize._init = True
    try:
        with _log_to(sink):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    finally:
        if bar is not None:
            bar.close()
    if rc != 0:
        text = "".join(errors)
        m = re.search(r"failed to quantize: (.*)", text)
        why = " ".join((m.group(1) if m else text or "no reason given").split())
        raise UnsupportedError(f"llama.cpp's quantizer refused --outtype {outtype}: {why}", src)
    return {"fallbacks": sum("falling back to" in l for l in lines)}


# -- importance matrices --------------------------------------------------------------------
@dataclass
class Imatrix:
    """Per GGUF weight name: ``sums`` (n_mat, in) float32 sums of squared activations, ``counts``
    (n_mat,) activation rows per matrix (an expert tensor: per expert)."""

    entries: dict = field(default_factory=dict)  # name -> (sums (n_mat, in), counts (n_mat,))
    datasets: list = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def normalized(self) -> dict[str, np.ndarray]:
        """What llama-quantize hands the quantizer: sums / count per matrix, 1 where a count is 0
        (GGUF form); the legacy form stores mean × ncall and is divided by ncall."""
        out = {}
        for name, (sums, counts) in self.entries.items():
            s = np.asarray(sums, dtype=np.float32).reshape(len(counts), -1)
            c = np.asarray(counts, dtype=np.float64)
            if self.legacy:
                n = float(c[0]) if len(c) else 0.0
                v = s / np.float32(n) if n > 0 else s
            else:
                v = np.where(c[:, None] > 0, s / np.maximum(c, 1).astype(np.float32)[:, None], np.float32(1))
            out[name] = np.ascontiguousarray(v.reshape(-1), dtype=np.float32)
        return out


def write_imatrix(path: str | os.PathLike, im: Imatrix) -> None:
    """The GGUF imatrix format, as llama-imatrix writes it (entries in name order)."""
    import gguf

    from ..fsutil import atomic_file

    w = gguf.GGUFWriter(None, "imatrix", use_temp_file=False)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix file has no architecture
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", [str(d) for d in im.datasets])
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.entries):
        sums, counts = im.entries[name]
        n = len(counts)
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32).reshape(n, -1))
        w.add_tensor(f"{name}.counts", np.asarray(counts, dtype=np.float32).reshape(n, 1))
    with atomic_file(path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Either format (a GGUF file by its magic, else legacy .dat), refusing malformed files."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such file", p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf_imatrix(p)
    return _read_legacy_imatrix(p)


def _read_gguf_imatrix(p: Path) -> Imatrix:
    from .gguf_model import field, open_gguf

    r = open_gguf(p)
    if field(r, "general.type") not in (None, "imatrix") or field(r, "general.architecture") is not None:
        raise InputError("a GGUF model, not an importance matrix (general.type is not 'imatrix')", p)
    sums, counts = {}, {}
    for t in r.tensors:
        if t.tensor_type.name != "F32":
            raise InputError(f"imatrix tensor {t.name!r} is {t.tensor_type.name}, not F32", p)
        a = np.array(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            ne = [int(x) for x in t.shape] + [1]
            sums[t.name[:-len(".in_sum2")]] = a.reshape(ne[1], ne[0])
        elif t.name.endswith(".counts"):
            counts[t.name[:-len(".counts")]] = a
    if not sums:
        raise InputError("no importance matrix entries (no *.in_sum2 tensors)", p)
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise InputError(f"imatrix entry {name!r} lacks its {'counts' if name in sums else 'in_sum2'} tensor", p)
        if len(counts[name]) != sums[name].shape[0]:
            raise InputError(f"imatrix entry {name!r}: {len(counts[name])} counts for {sums[name].shape[0]} matrices", p)
        entries[name] = (sums[name], np.rint(counts[name]).astype(np.int64))
    ds = field(r, "imatrix.datasets") or []
    return Imatrix(entries, list(ds) if isinstance(ds, list) else [ds], int(field(r, "imatrix.chunk_count") or 0),
                   int(field(r, "imatrix.chunk_size") or 0), legacy=False)


def _read_legacy_imatrix(p: Path) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise InputError("not an importance matrix (neither GGUF nor llama-imatrix's .dat format: truncated)", p)
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1 << 20:
        raise InputError("not an importance matrix (neither GGUF nor llama-imatrix's .dat format)", p)
    entries = {}
    for _ in range(n_entries):
        (ln,) = take("<i")
        if ln < 1 or ln > 4096:
            raise InputError("not an importance matrix (a bad entry name length in the .dat format)", p)
        (raw,) = take(f"<{ln}s")
        ncall, nval = take("<ii")
        if nval < 1:
            raise InputError("not an importance matrix (an entry without values in the .dat format)", p)
        vals = np.array(take(f"<{nval}f"), dtype=np.float32)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("not an importance matrix (an entry name is not UTF-8)", p) from None
        entries[name] = (vals.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if 0 < ln <= len(data) - pos:
                datasets.append(data[pos:pos + ln].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunks, 0, legacy=True)


def check_imatrix(im: Imatrix, tensors: dict[str, tuple], path) -> None:
    """Every entry names a weight of this model with its size (row length × experts), as llama.cpp
    needs it; an imatrix for another model is refused here, before anything is written."""
    for name, (sums, counts) in im.entries.items():
        if name not in tensors:
            raise IncompatibleError(f"imatrix entry {name!r} is not a tensor of this model (an importance matrix for "
                                    "another model?)", path)
        shape = tensors[name]
        want = int(shape[-1]) * (int(shape[0]) if len(shape) == 3 else 1)
        got = int(np.asarray(sums).size)
        if got != want:
            raise IncompatibleError(f"imatrix entry {name!r} has {got} values but the tensor {tuple(shape)} needs "
                                    f"{want} (an importance matrix for another model?)", path)
        if not np.all(np.isfinite(np.asarray(sums))):
            raise InputError(f"imatrix entry {name!r} has NaN/Inf values", path)


def compute_imatrix(model_dir: str | os.PathLike, adapters=(), weights=None, calibration: str | os.PathLike = "",
                    chunk: int = 512, quiet: bool = True) -> Imatrix:
    """An importance matrix from loratools' fp32 reference decoder (base + ``adapters``, applied
    unmerged) over the calibration text (.txt or .jsonl, read as ``train`` reads it): the examples'
    tokens back to back, cut into chunks of ``chunk`` tokens, each run from an empty cache. Per
    weight matrix of the layers (``blk.*``, as llama-imatrix collects them; not the output layer):
    the sums of squared input activations per input column and the number of rows summed; per
    expert for a mixture of experts (the rows routed to each expert)."""
    import torch

    from ..models.config import load_config
    from ..models.decoder import Linear, load_model
    from ..ops.common import progress
    from ..train.data import load as load_data
    from . import gguf_moe
    from .gguf_model import name_map

    ds = load_data(calibration, model_dir)
    ids = [t for e in ds.examples for t in e.ids]
    if not ids:
        raise InputError("the calibration file has no tokens", calibration)
    cfg = load_config(model_dir)
    chunk = max(1, min(chunk, int(getattr(cfg, "max_position_embeddings", 0) or chunk)))  # the trained context at most
    model = load_model(model_dir, adapters=adapters, weights=weights)
    names = name_map(model.cfg)
    mv = gguf_moe.moe_values(model.cfg)
    expert_re = None
    if mv is not None:
        expert_re = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(mv.block)}\.experts\.(\d+)\.(\w+)$")
    acc: dict[str, list] = {}  # gguf name -> [sums float64 (n_mat, in), counts int64 (n_mat,)]
    hooks = []

    def hook_for(gname: str, n_mat: int, slot: int):
        def pre(mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            e = acc.setdefault(gname, [np.zeros((n_mat, x.shape[1])), np.zeros(n_mat, dtype=np.int64)])
            e[0][slot] += (x * x).sum(0).cpu().numpy()
            e[1][slot] += x.shape[0]
        return pre

    for mname, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        m = expert_re.match(mname) if expert_re is not None else None
        if m is not None:
            layer, e, leaf = int(m.group(1)), int(m.group(2)), m.group(3)
            if leaf not in mv.leaves:
                continue
            gname = gguf_moe.stacked_name(layer, gguf_moe.ROLES[list(mv.leaves).index(leaf)])
            hooks.append(mod.register_forward_pre_hook(hook_for(gname, mv.experts, e)))
            continue
        gname = names.get(f"{mname}.weight")
        if gname is None or not gname.startswith("blk."):
            continue  # the output layer (llama-imatrix leaves it out by default) and non-layer tensors
        hooks.append(mod.register_forward_pre_hook(hook_for(gname, 1, 0)))
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    try:
        with torch.no_grad():
            for c in progress(chunks, "imatrix", quiet=quiet):
                model.hidden(torch.tensor([c]))
    finally:
        for h in hooks:
            h.remove()
    del model, cfg
    entries = {}
    for gname, (sums, counts) in acc.items():
        if not np.all(np.isfinite(sums)):
            raise InputError(f"non-finite activations for {gname} (the model overflows on this text)", calibration)
        entries[gname] = (sums.astype(np.float32), counts)
    return Imatrix(entries, [str(calibration)], len(chunks), chunk, legacy=False)
