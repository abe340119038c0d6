"""GGUF models for llama.cpp: export an HF checkpoint (adapters merged on the fly) and import
a GGUF back into an HF checkpoint.

Export is a plain sequence: hyper-parameter and tokenizer key-values, the tensor infos (all
known from the checkpoint headers), then the tensor data, one tensor at a time — read, merged
(``MergedView``), permuted, quantized, written. Peak memory is a few copies of one tensor.

Per-family facts (architecture name, hyper-parameter keys, the value transforms: Q/K
permutation, norm offset; tied or written output; generated rope tensors; what llama.cpp cannot
compute) are the tables of ``gguf_arch``; this module only runs them. Norms, biases and other 1-D
tensors stay F32.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..adapter import Adapter
from ..checkpoint import Checkpoint, CheckpointWriter
from ..errors import IncompatibleError, InputError, LoratoolsError, UnsupportedError
from ..fsutil import BackgroundSync, SeqFile, atomic_file, check_output, check_space, temp_path
from ..ops.common import check_finite, check_output_finite
from ..models.config import ModelConfig, load_config, parse_config
from ..models.decoder import DecoderLM, check_fits
from . import gguf_arch, gguf_moe
from .gguf_arch import permute_qk, unpermute_qk  # noqa: F401 - re-exported (tests, validate)
from .gguf_quant import WRITER_OUTTYPES as OUTTYPES  # the in-house writer's

SOURCE_CONFIG_KEY = "loratools.source_config"


LEGACY_QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}


def _gguf():
    import gguf

    return gguf


def _moe_blocks(n: str) -> bool:
    return ".mlp." in n or ".block_sparse_moe." in n


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Decoder name -> shape of every tensor but the stacked experts (gguf_moe: those are many
    checkpoint tensors per GGUF tensor). A dense family: the reference decoder's own; a mixture of
    experts: its attention and norms, the sinks, and the MoE blocks' router and shared expert."""
    with torch.device("meta"):
        shapes = dict(DecoderLM(cfg).expected_shapes())
    mv = gguf_moe.moe_values(cfg)
    if mv is None:
        return shapes
    shapes = {n: s for n, s in shapes.items() if not _moe_blocks(n)}
    if cfg.spec.attn_sinks:
        for i in range(cfg.num_hidden_layers):
            shapes[f"model.layers.{i}.self_attn.sinks"] = (cfg.num_attention_heads,)
    for n, (g, shape) in gguf_moe.block_tensors(cfg, mv).items():
        shapes[n] = (1, cfg.hidden_size) if g.endswith("ffn_gate_inp_shexp.weight") else shape
    return shapes


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """HF tensor name → GGUF tensor name (``model.layers.0.self_attn.q_proj.weight`` →
    ``blk.0.attn_q.weight``) for every parameter of this config's model (a mixture of experts: all
    but the experts, which gguf_moe stacks)."""
    gguf = _gguf()
    fam = gguf_arch.family(cfg)
    tmap = gguf.get_tensor_name_map(_arch_enum(fam.arch), cfg.num_hidden_layers)
    names = list(expected_shapes(cfg))
    mv = gguf_moe.moe_values(cfg)
    out = {n: g for n, (g, _) in gguf_moe.block_tensors(cfg, mv).items()} if mv is not None else {}
    names = [n for n in names if n not in out]
    for n in names:
        g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        if g is None and n == "lm_head.weight" and fam.output == "never":
            continue  # the architecture has no output tensor: the head is always token_embd
        if g is None:
            raise UnsupportedError(f"no GGUF name for tensor {n!r} ({fam.arch})")
        if not n.endswith((".weight", ".bias")):
            g += ".weight"  # a saved buffer (Gemma 4's layer_scalar): llama.cpp reads it as .weight, as its converter writes
        out[n] = g
    return out


def _arch_enum(name: str):
    gguf = _gguf()
    return {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[name]


def _qtype_for(name: str, shape: tuple, outtype: str):
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or outtype == "F32":
        return Q.F32
    q = Q[outtype]
    block, _ = gguf.GGML_QUANT_SIZES[q]
    if shape[-1] % block:
        raise IncompatibleError(f"cannot store tensor {name!r} as {outtype}: its row length {shape[-1]} is not a multiple of "
                                f"the {block}-element block (use --outtype f16, bf16 or f32)")
    return q


def _info_args(shape: tuple, qtype):
    """(shape, numpy dtype, nbytes) as GGUFWriter.add_tensor_info wants them."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4, None
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), int(np.prod(shape)) * 2, None
    bshape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return bshape, np.dtype(np.uint8), int(np.prod(bshape)), qtype


def _check_f16(h: torch.Tensor, name: str | None) -> None:
    """Refuse values that overflow float16 (the inputs are finite: MergedView checked them), exit 3."""
    check_output_finite(h, name or "?", "float16", "use --outtype bf16 or f32")


def _encode(t: torch.Tensor, qtype, name: str | None = None) -> np.ndarray:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    a = t.detach().to(torch.float32).cpu().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        with np.errstate(over="ignore"):  # an overflow is refused just below, with the tensor named
            h = a.astype(np.float16)
        _check_f16(torch.from_numpy(h), name)
        return h
    return gguf.quants.quantize(a, qtype).view(np.uint8)


BLOCK_BYTES = 64 << 20  # float32 bytes of a tensor converted and written at a time (a module constant: tests lower it)
STREAMED = True  # F32/F16 blocks converted by torch into reused buffers; tests set False: numpy's _encode per block


def _write_rows(w, t: torch.Tensor, qtype, name: str | None = None) -> None:
    """``w.write_tensor_data(_encode(t.float(), qtype))`` a block of rows at a time: the same bytes (a
    row-major tensor's bytes are its row blocks' bytes, for F32/F16/BF16 and the block quants, whose blocks
    run along rows), without a whole float32 copy and a whole encoded copy beside ``t``. Alignment padding
    as GGUFWriter.write_tensor_data writes it: before the tensor to the file offset, after it to its size."""
    gguf = _gguf()
    native = gguf.GGUFEndian.BIG if sys.byteorder == "big" else gguf.GGUFEndian.LITTLE
    if t.dim() < 2 or w.endianess != native:
        _write_array(w, _encode(t.float(), qtype, name))
        return
    _write_parts(w, iter((t,)), qtype, name)


def _write_array(w, a: np.ndarray) -> None:
    """GGUFWriter.write_tensor_data (the next planned tensor, byte-swapped to the file's order, with
    its alignment padding) through the writer's file object's ``write`` (a SeqFile has no descriptor
    for numpy's ``tofile``)."""
    gguf = _gguf()
    native = gguf.GGUFEndian.BIG if sys.byteorder == "big" else gguf.GGUFEndian.LITTLE
    if w.state is not gguf.gguf_writer.WriterState.TI_DATA and w.state is not gguf.gguf_writer.WriterState.WEIGHTS:
        raise ValueError(f"Expected output file to contain tensor info or weights, got {w.state}")
    if w.endianess != native:
        a = a.byteswap(inplace=False)
    file_id = next(i for i, ts in enumerate(w.tensors) if len(ts) > 0)
    fout = w.fout[file_id]
    ti = w.tensors[file_id].pop(next(iter(w.tensors[file_id])))
    if ti.nbytes != a.nbytes:
        raise AssertionError(f"a {a.nbytes}-byte array for a {ti.nbytes}-byte tensor")
    w.write_padding(fout, fout.tell())
    fout.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    w.write_padding(fout, a.nbytes)
    w.state = gguf.gguf_writer.WriterState.WEIGHTS


def _open_seq(w, path: Path, direct: bool | None = None) -> None:
    """Point the GGUFWriter at ``path`` through a SeqFile (large sequential direct writes): its
    header, key-values and tensor infos go through ``write``, the tensors through ``_write_parts`` /
    ``_write_array``."""
    gguf = _gguf()
    if w.state is not gguf.gguf_writer.WriterState.NO_FILE or len(w.tensors) != 1:
        raise ValueError(f"Expected one output file not yet opened, got {w.state}")
    w.path = Path(path)
    w.fout = [SeqFile(path, direct)]
    w.state = gguf.gguf_writer.WriterState.EMPTY


class _Buffers:
    """Reused conversion buffers, one per dtype (a fresh large allocation costs a page fault per 4 KiB)."""

    def __init__(self):
        self._b: dict = {}

    def get(self, shape, dtype):
        n = int(np.prod(shape))
        b = self._b.get(dtype)
        if b is None or b.numel() < n:
            self._b.pop(dtype, None)
            b = self._b[dtype] = torch.empty(n, dtype=dtype)
        return b[:n].view(tuple(shape))

    def clear(self) -> None:
        self._b.clear()


_BUF = _Buffers()     # conversion of a block to the output type
_MERGED = _Buffers()  # merged rows (a block is converted from here into _BUF)


def _write_parts(w, parts, qtype, name: str | None = None) -> None:
    """One tensor written from consecutive parts (``parts`` yields row-major tensors of one row
    length whose rows, in order, are the tensor's): a stacked (E, a, b) expert tensor is its experts'
    (a, b) slabs, one at a time, each a block of rows at a time."""
    gguf = _gguf()
    native = gguf.GGUFEndian.BIG if sys.byteorder == "big" else gguf.GGUFEndian.LITTLE
    if w.endianess != native:
        _write_array(w, _encode(torch.cat([p.float().reshape(-1, p.shape[-1]) for p in parts]), qtype, name))
        return
    if w.state is not gguf.gguf_writer.WriterState.TI_DATA and w.state is not gguf.gguf_writer.WriterState.WEIGHTS:
        raise ValueError(f"Expected output file to contain tensor info or weights, got {w.state}")
    file_id = next(i for i, ts in enumerate(w.tensors) if len(ts) > 0)
    fout = w.fout[file_id]
    ti = w.tensors[file_id].pop(next(iter(w.tensors[file_id])))
    w.write_padding(fout, fout.tell())
    written = 0
    for t in parts:
        rows = t.reshape(-1, t.shape[-1])
        step = max(1, BLOCK_BYTES // (4 * rows.shape[1]))
        for i in range(0, rows.shape[0], step):
            blk = rows[i:i + step]
            if STREAMED and qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                # the same rounding as numpy's astype (IEEE round to nearest even), into a reused buffer
                h = _BUF.get(blk.shape, torch.float32 if qtype == gguf.GGMLQuantizationType.F32 else torch.float16)
                h.copy_(blk)
                if h.dtype == torch.float16:
                    _check_f16(h, name)
                fout.write(memoryview(h.numpy()).cast("B"))
                written += h.numel() * h.element_size()
                continue
            a = _encode(blk.float(), qtype, name)
            fout.write(memoryview(np.ascontiguousarray(a)).cast("B"))
            written += a.nbytes
    if written != ti.nbytes:
        raise AssertionError(f"wrote {written} bytes of a {ti.nbytes}-byte tensor")
    w.write_padding(fout, written)
    w.state = gguf.gguf_writer.WriterState.WEIGHTS


# llama.cpp sets token attributes by general.name: a name containing one of these words makes it look
# these tokens up, and a vocabulary without them stops the load (unordered_map::at, llama-vocab.cpp)
NAME_RULES = ((("phi-3", "phi3"), ("</s>", "<unk>", "<s>", "<|endoftext|>")),)


def _check_name(w, report: dict) -> None:
    gguf = _gguf()
    key = gguf.Keys.General.NAME
    kv = w.kv_data[0]
    name = kv[key].value
    tokens = set(kv[gguf.Keys.Tokenizer.LIST].value)
    for words, needed in NAME_RULES:
        missing = [t for t in needed if t not in tokens]
        if any(x in name.lower() for x in words) and missing:
            safe = name.lower()
            for x in words:
                safe = safe.replace(x, "")
            safe = safe.strip("-_ .") or "model"
            kv[key] = gguf.GGUFValue(value=safe, type=gguf.GGUFValueType.STRING)
            report["warnings"].append(f"general.name {name!r} written as {safe!r}: llama.cpp treats a name with "
                                      f"{words[0]!r} as that model and looks up tokens this vocabulary lacks "
                                      f"({', '.join(missing)})")


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, adapters: Sequence[Adapter] = (),
                weights: Sequence[float] | None = None, outtype: str = "f16", pre: str | None = None,
                overwrite: bool = False, quiet: bool = True, imatrix: str | os.PathLike | None = None,
                calibration: str | os.PathLike | None = None, save_imatrix: str | os.PathLike | None = None,
                chunk: int = 512) -> dict:
    """Write ``model_dir`` (with ``adapters`` merged) as a llama.cpp GGUF model.

    f32/f16/bf16/q8_0 are written here, tensor by tensor. K-quants and i-quants (and, when
    llama-cpp-python is installed, the legacy q4_0/q4_1/q5_0/q5_1) are made by llama.cpp's own
    quantizer from an f32 intermediate (``export_quantized``), so the per-tensor types are
    llama-quantize's; without llama-cpp-python the legacy types are written here with its rule
    for the output layer (a tied token_embd too): Q8_0 instead of the 4/5-bit type.

    An adapter that changes the two sides of tied embeddings differently unties them, as merge does:
    output.weight is written and the stored source config says tie_word_embeddings=false. One that
    changes both by the same delta (as extract writes it) keeps the tie."""
    from . import gguf_quant

    if outtype not in gguf_quant.all_outtypes():
        raise LoratoolsError(f"unknown --outtype {outtype!r} (one of {', '.join(gguf_quant.all_outtypes())})")
    uses_imatrix = imatrix is not None or calibration is not None
    if save_imatrix is not None and calibration is None:
        raise LoratoolsError("--save-imatrix needs --calibration (the text the importance matrix is computed from)")
    if imatrix is not None and calibration is not None:
        raise LoratoolsError("--imatrix and --calibration are alternatives: give one")
    if outtype in gguf_quant.LLAMA_OUTTYPES and (outtype not in OUTTYPES or uses_imatrix or gguf_quant.available()):
        return export_quantized(model_dir, out, adapters, weights, outtype, pre, overwrite, quiet, imatrix,
                                calibration, save_imatrix, chunk)
    if uses_imatrix:
        raise LoratoolsError(f"--imatrix/--calibration apply to llama.cpp's quantized types (q4_k_m, iq4_xs, ...), "
                             f"not --outtype {outtype}")
    return _export(model_dir, out, adapters, weights, outtype, pre, overwrite, quiet)


def _export(model_dir, out, adapters=(), weights=None, outtype: str = "f16", pre=None, overwrite: bool = False,
            quiet: bool = True, direct: bool | None = None) -> dict:
    """The in-house streamed writer (f32, f16, bf16, q8_0; the legacy 4/5-bit types without llama.cpp).
    ``direct``: SeqFile's choice (None: fsutil.DIRECT_IO; False for a file read back at once)."""
    from ..ops.common import progress
    from ..ops.merge import MergedView
    from . import gguf_vocab

    gguf = _gguf()
    F32 = gguf.GGMLQuantizationType.F32
    qname = OUTTYPES[outtype]
    check_output(out, [model_dir] + [a.source for a in adapters if a.source], overwrite, file=True)
    cfg = load_config(model_dir)
    fam = gguf_arch.family(cfg, model_dir)
    fam.check(cfg, model_dir)
    report = {"model": str(model_dir), "out": str(out), "arch": fam.arch, "outtype": outtype, "warnings": []}
    windows = {w for w in cfg.layer_windows if w is not None}
    if windows and not fam.swa:
        report["warnings"].append(f"llama.cpp's {fam.arch} architecture ignores sliding_window={min(windows)}: "
                                  f"its results differ from the source beyond {min(windows)} tokens")
    report["warnings"] += fam.warnings(cfg)
    with Checkpoint.open(model_dir) as ck:
        view = MergedView(ck, adapters, weights)
        cfg = view.merged_cfg  # what is written: a lora_bias merge turns the family's bias switch on
        names = name_map(cfg)
        mv = gguf_moe.moe_values(cfg, model_dir)
        stacked, consumed = [], set()
        shapes = {n: tuple(view.info(n).shape) for n in view.names()}
        if mv is None:
            check_fits(cfg, shapes, ck.path)  # llama.cpp would refuse the file
        else:
            reader = gguf_moe.ExpertReader(view, cfg, mv, ck.path)
            stacked, consumed = gguf_moe.stacked_plan(cfg, mv, reader), reader.consumed()
            _check_moe(cfg, mv, shapes, ck.path, stored=consumed)
            report["experts"] = {"count": mv.experts, "used": mv.top_k, "layers": sum(mv.moe_layers)}
        if view.untie and fam.output == "never":
            raise UnsupportedError(f"the adapter changes the tied embedding and output head differently (the merged "
                                   f"embedding and head are no longer equal), and llama.cpp's {fam.arch} "
                                   "architecture always uses token_embd as its output layer: the untied model cannot be "
                                   "written as GGUF", model_dir)
        tied = cfg.tie_word_embeddings and not view.untie
        disk = {cfg.to_internal(n): n for n in view.names() if cfg.to_internal(n) is not None}  # decoder name -> stored
        plan = []  # (gguf name, hf name or None, shape, qtype, fp32 tensor getter)
        skipped = 0
        for n in view.names():
            if n in consumed:
                continue  # an expert tensor: written as part of its layer's stacked tensor
            own = cfg.to_internal(n)  # the decoder's name (a multimodal checkpoint's text prefix dropped)
            if own is None or own.endswith("rotary_emb.inv_freq"):
                skipped += own is None  # not part of the text decoder (a vision tower): llama.cpp runs text
                continue
            if own == "lm_head.weight" and tied:
                continue  # llama.cpp uses token_embd when output.weight is absent
            if own not in names:
                raise UnsupportedError(f"tensor {n!r} has no place in a GGUF {fam.arch} model", ck.path)
            if own.endswith(".bias") and gguf_arch.role(names[own]) not in fam.biases:
                raise UnsupportedError(f"llama.cpp's {fam.arch} architecture has no {gguf_arch.role(names[own])} bias "
                                       f"(tensor {n!r})", ck.path)
            shape = view.info(n).shape
            if names[own].endswith("ffn_gate_inp_shexp.weight"):  # (1, H) on disk, a vector in llama.cpp
                shape = (shape[-1],)
                plan.append((names[own], n, shape, F32, lambda n=n: view.tensor(n, mapped=True).reshape(-1)))
                continue
            q = F32 if gguf_arch.role(names[own]) in gguf_arch.F32_ROLES else _qtype_for(n, shape, qname)
            plan.append((names[own], n, shape, q, lambda n=n: view.tensor(n, mapped=True)))
        for gname, shape, is_weight, get in stacked:
            plan.append((gname, None, shape, _qtype_for(gname, shape, qname) if is_weight else F32, get))
        if tied and fam.output == "required":  # the tied head written as its own tensor
            emb = disk["model.embed_tokens.weight"]
            shape = view.info(emb).shape
            plan.append(("output.weight", emb, shape, _qtype_for(emb, shape, qname), lambda: view.tensor(emb, mapped=True)))
        for gname, make in fam.extra:
            t = make(cfg)
            if t is not None:
                plan.append((gname, None, tuple(t.shape), F32, lambda t=t: t))
        if qname in LEGACY_QTYPES:
            # llama-quantize's rule for the output layer (token_embd when the file has no output.weight):
            # Q6_K, or Q8_0 where the rows do not fit 256-blocks; loratools writes Q8_0 (no Q6_K quantizer here)
            head = "output.weight" if any(p[0] == "output.weight" for p in plan) else "token_embd.weight"
            for i, (gname, hf, shape, q, get) in enumerate(plan):
                if gname == head and q != F32:
                    plan[i] = (gname, hf, shape, gguf.GGMLQuantizationType.Q8_0, get)
                    if shape[-1] % 256 == 0:
                        report["warnings"].append(f"{head} written as Q8_0: llama-quantize stores it as Q6_K, which "
                                                  "needs llama.cpp's quantizer (pip install 'loratools[llama]')")
        w = gguf.GGUFWriter(None, fam.arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(Path(model_dir).resolve().name)
        gguf_arch.write_kvs(w, fam, cfg)
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[qname]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        report["tokenizer"] = gguf_vocab.add_tokenizer(w, Path(model_dir), cfg.vocab_size, pre)
        _check_name(w, report)
        w.add_string(SOURCE_CONFIG_KEY, json.dumps(view.config(), sort_keys=True))
        nbytes = 0
        for gname, _, shape, q, _ in plan:
            ishape, idtype, n, raw = _info_args(shape, q)
            w.add_tensor_info(gname, ishape, idtype, n, raw_dtype=raw)
            nbytes += n
        check_space(out, nbytes, "the GGUF file")
        with atomic_file(out) as tmp, BackgroundSync() as sync, _closing(w):
            _open_seq(w, tmp, direct)
            w.write_header_to_file()
            sync.add(w.fout[0].sync_fd())  # (through the page cache where direct I/O is refused)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for gname, hf, shape, q, get in progress(plan, "gguf", quiet=quiet):
                if STREAMED and hf is not None and view.plain(hf) and not gguf_arch.changes(fam, gname, cfg):
                    _write_parts(w, _merged_blocks(view, hf), q, hf)  # merged a block of rows at a time
                    continue
                t = get()  # as stored (mapped) when no adapter changes it, else the merged fp32 tensor
                if not isinstance(t, torch.Tensor):  # a stacked expert tensor: its experts' slabs, one at a time
                    _write_parts(w, t, q, gname)
                elif hf is not None and gguf_arch.changes(fam, gname, cfg):
                    g = gguf_arch.to_gguf(fam, gname, t.float(), cfg)
                    if STREAMED and g.dim() >= 2:
                        _write_parts(w, iter((g,)), q, hf)  # the same bytes, converted into reused buffers
                    else:
                        _write_array(w, _encode(g, q, hf))
                else:
                    _write_rows(w, t, q, hf or gname)
            sync.close()
            w.close()
    report["tensors"] = len(plan)
    if skipped:
        report["skipped_non_text_tensors"] = skipped
    if view.untie:
        report["untied_embeddings"] = True
    for msg in report["warnings"]:
        warnings.warn(msg, stacklevel=2)
    return report


def _merged_blocks(view, name: str):
    """The merged tensor ``name`` (``view.plain``) as consecutive blocks of rows, each computed into one
    reused float32 buffer (``MergedView.merge_rows``: the bytes of the whole-tensor merge)."""
    from ..ops import merge as merge_mod

    view.check_input(name, view.ck.get_mapped(view.source(name)))
    rows, cols = view.info(name).shape
    for r0, r1 in merge_mod.row_blocks(rows, cols):
        yield view.merge_rows(name, _MERGED.get((r1 - r0, cols), torch.float32), r0, r1)
    view.modified.append(name)


class _closing:
    """Free the reused buffers; close a GGUFWriter's files when the export fails (on success
    ``w.close()`` has run)."""

    def __init__(self, w):
        self.w = w

    def __enter__(self):
        return self.w

    def __exit__(self, et, ev, tb):
        _BUF.clear()
        _MERGED.clear()
        if et is not None and self.w is not None:
            for f in self.w.fout or []:
                f.abort() if isinstance(f, SeqFile) else f.close()


def export_quantized(model_dir, out, adapters=(), weights=None, outtype: str = "q4_k_m", pre=None,
                     overwrite: bool = False, quiet: bool = True, imatrix=None, calibration=None, save_imatrix=None,
                     chunk: int = 512) -> dict:
    """A type of llama.cpp's quantizer: the streamed f32 export to an intermediate beside ``out``
    (a hidden temporary name, removed on success and failure), then ``llama_model_quantize`` into a
    temporary file renamed to ``out``. ``imatrix``: a file as llama-imatrix writes it;
    ``calibration``: text to compute one from with the reference decoder (base + adapters),
    saved to ``save_imatrix`` when given."""
    from . import gguf_quant

    gguf_quant.require(outtype)
    if outtype in gguf_quant.NEEDS_IMATRIX and imatrix is None and calibration is None:
        raise LoratoolsError(f"--outtype {outtype} needs an importance matrix (llama.cpp refuses it without one): "
                             "give --imatrix FILE or --calibration TEXT")
    out = Path(out)
    inputs = [model_dir, imatrix, calibration] + [a.source for a in adapters if a.source]
    check_output(out, inputs, overwrite, file=True)
    if save_imatrix is not None:
        check_output(save_imatrix, inputs, overwrite, file=True)
        if Path(save_imatrix).resolve() == out.resolve():
            raise LoratoolsError("--save-imatrix and the output are the same file", save_imatrix)
    im = None
    if imatrix is not None:
        im = gguf_quant.read_imatrix(imatrix)
    elif calibration is not None:
        im = gguf_quant.compute_imatrix(model_dir, adapters, weights, calibration, chunk, quiet)
    mid = temp_path(out, ".f32.gguf")  # a name that fits beside any legal output name
    try:
        rep = _export(model_dir, mid, adapters, weights, "f32", pre, False, quiet, direct=False)  # read back at once: cached
        if im is not None:
            reader = open_gguf(mid)
            shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
            del reader
            gguf_quant.check_imatrix(im, shapes, imatrix if imatrix is not None else calibration)
        with atomic_file(out) as tmp:
            q = gguf_quant.quantize(mid, tmp, outtype, im.normalized() if im is not None else None, quiet)
        if save_imatrix is not None:
            gguf_quant.write_imatrix(save_imatrix, im)
    finally:
        mid.unlink(missing_ok=True)
    reader = open_gguf(out)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    rep.update(out=str(out), outtype=outtype, quantizer="llama.cpp llama_model_quantize (from an f32 intermediate)",
               tensor_types=types, fallbacks=q["fallbacks"])
    if im is not None:
        rep["imatrix"] = {"source": str(imatrix if imatrix is not None else calibration), "entries": len(im.entries),
                          "chunks": im.chunk_count, "chunk_size": im.chunk_size,
                          **({"saved": str(save_imatrix)} if save_imatrix is not None else {})}
    return rep


def _check_moe(cfg, mv, shapes: dict, path, stored=None) -> None:
    """check_fits for a mixture of experts: the 1:1 tensors and every expert tensor, with the shapes
    config.json implies, nothing else and nothing missing (``lm_head.weight`` may be absent).
    ``stored``: the expert tensors of a checkpoint (an ExpertReader checked them), else the layout
    import writes."""
    expected = expected_shapes(cfg)
    experts = set(stored) if stored is not None else set(gguf_moe.disk_expert_shapes(cfg, mv))
    own = {cfg.to_internal(n): s for n, s in shapes.items() if cfg.to_internal(n) is not None}
    if stored is None:
        gguf_moe.check_experts(cfg, mv, own, path)
    for n, s in own.items():
        if n in experts or n.endswith("rotary_emb.inv_freq"):
            continue
        if n not in expected:
            raise IncompatibleError(f"tensor {n!r} is not part of a {cfg.model_type} model with this config", path)
        if tuple(s) != tuple(expected[n]):
            raise IncompatibleError(f"tensor {n!r} has shape {tuple(s)} but config.json implies {tuple(expected[n])}", path)
    missing = [n for n in expected if n not in own and n != "lm_head.weight"]
    if missing:
        raise IncompatibleError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}", path)


# -- import --------------------------------------------------------------------------------
_REQUIRED_INTS = ("attention.head_count", "embedding_length", "feed_forward_length", "block_count")
_OPTIONAL_INTS = ("attention.head_count_kv", "attention.key_length", "rope.dimension_count", "context_length", "vocab_size",
                  "expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length",
                  "attention.sliding_window", "rope.scaling.original_context_length")
_OPTIONAL_FLOATS = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor", "attention.scale",
                    "embedding_scale", "residual_scale", "logit_scale", "rope.scaling.yarn_beta_fast",
                    "rope.scaling.yarn_beta_slow")

def field(reader, key: str, default=None):
    """A GGUF key's Python value (gguf_vocab's reader of fields), or ``default``."""
    from .gguf_vocab import gguf_field_value

    f = reader.fields.get(key)
    return default if f is None else gguf_field_value(f)


def _precheck(path: Path) -> None:
    """Header sanity before gguf-py parses anything: magic, version, and counts the file can hold."""
    from .gguf_header import read_header

    read_header(path)


MAX_GGUF_STRINGS = 2**22  # strings in all metadata arrays (a 262k vocabulary plus its merges is < 2**20)
MAX_GGUF_DIMS = 8


@functools.lru_cache(maxsize=1)
def _reader_class():
    """gguf-py's GGUFReader with metadata arrays read in bounded memory. gguf-py makes a numpy view
    per array element (about 1.6 KB each: an 8 MB file of a million empty strings takes 1.8 GB);
    here a numeric array is one view of the file, an array's strings are plain bytes (their count
    checked against the bytes left before any is read, and capped overall), nested arrays are
    refused, and every tensor's dimensions are checked before gguf-py computes with them."""
    import struct
    import sys

    from .. import st

    gguf = _gguf()
    VT = gguf.GGUFValueType

    class Bytes(bytes):
        __slots__ = ()

        def tobytes(self) -> bytes:  # as numpy's views answer gguf-py's ReaderField.contents()
            return bytes(self)

        @property
        def nbytes(self) -> int:
            return len(self)

    empty = Bytes()

    class BoundedReader(gguf.GGUFReader):
        def __init__(self, path):
            self._path, self._strings = Path(path), 0
            super().__init__(path)

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != VT.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            size, offs = len(self.data), orig_offs + 12
            if offs > size:
                raise ValueError("an array header runs past the end of the file (out of bounds)")
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            itype, count = int(raw_itype[0]), int(alen[0])
            parts = [raw_itype, alen]
            if itype == VT.STRING:
                if count > (size - offs) // 8:
                    raise ValueError(f"an array of {count} strings runs past the end of the file (out of bounds)")
                self._strings += count
                if self._strings > MAX_GGUF_STRINGS:
                    raise ValueError(f"its metadata arrays hold more than {MAX_GGUF_STRINGS} strings")
                swapped = self.byte_order == "S"
                fmt = ("<Q" if (sys.byteorder == "little") != swapped else ">Q")
                mv = memoryview(self.data)
                for _ in range(count):
                    if offs + 8 > size:
                        raise ValueError("a string runs past the end of the file (out of bounds)")
                    n = struct.unpack_from(fmt, mv, offs)[0]
                    if n > size - offs - 8:
                        raise ValueError("a string runs past the end of the file (out of bounds)")
                    parts.append(Bytes(mv[offs + 8:offs + 8 + n]) if n else empty)
                    offs += 8 + n
                return offs - orig_offs, parts, range(2, 2 + count), [VT.ARRAY, VT.STRING]
            nptype = self.gguf_scalar_to_np.get(VT(itype)) if itype in VT._value2member_map_ else None
            if nptype is None:
                raise ValueError(f"an array of GGUF value type {itype} (nested arrays are not read)")
            width = np.dtype(nptype).itemsize
            if count > (size - offs) // width:
                raise ValueError(f"an array of {count} values runs past the end of the file (out of bounds)")
            parts.append(self._get(offs, nptype, count))
            return 12 + count * width, parts, [2], [VT.ARRAY, VT(itype)]

        def _get_tensor_info_field(self, orig_offs):
            f = super()._get_tensor_info_field(orig_offs)
            n_dims, dims = int(f.parts[2][0]) if len(f.parts[2]) else -1, f.parts[3]
            if not 0 <= n_dims <= MAX_GGUF_DIMS or len(dims) != n_dims:
                raise InputError(f"tensor {f.name[:100]!r} has {n_dims} dimensions (truncated, or more than "
                                 f"{MAX_GGUF_DIMS})", self._path)
            st.check_dims([int(d) for d in dims], f"tensor {f.name[:100]!r}", self._path)
            return f

    return BoundedReader


def open_gguf(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    _precheck(path)
    try:
        reader = _reader_class()(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/IndexError/struct errors on bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in msg:
            msg = f"unknown tensor type ({msg})"
        elif "out of bounds" in msg or "reshape" in msg or "divisor" in msg:
            msg = f"truncated or corrupt (a string, tensor info or tensor data runs past the end of the file: {msg})"
        raise InputError(f"not a readable GGUF file: {msg}", path) from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InputError(f"tensor {t.name!r}: its data ({t.n_bytes} bytes at {t.data_offset}) lies past the end of the file", path)
    return reader


def config_from_gguf(reader, path) -> dict:
    if field(reader, "general.type") == "adapter" or field(reader, "adapter.type") is not None:
        raise InputError("this is a LoRA adapter GGUF, not a model (import reads models; adapters load with --base)", path)
    arch = field(reader, "general.architecture")
    src = field(reader, SOURCE_CONFIG_KEY)
    if src:
        try:
            cfg = json.loads(src)
        except (TypeError, ValueError):
            raise InputError(f"{SOURCE_CONFIG_KEY} is not valid JSON", path) from None
        if not isinstance(cfg, dict):
            raise InputError(f"{SOURCE_CONFIG_KEY} is not a JSON object", path)
        return cfg
    if arch not in gguf_arch.IMPORTS:
        raise UnsupportedError(f"GGUF architecture {arch!r} cannot be imported without loratools' source config "
                               f"({', '.join(gguf_arch.IMPORTS)})", path)
    model_type, hf_class, extra = gguf_arch.IMPORTS[arch]
    if arch in gguf_arch.MOE_IMPORTS and field(reader, f"{arch}.expert_count"):
        model_type, hf_class, extra = gguf_arch.MOE_IMPORTS[arch]

    def g(k, d=None):
        v = field(reader, f"{arch}.{k}", d)
        if k in _REQUIRED_INTS or (v is not d and k in _OPTIONAL_INTS):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"GGUF key {arch}.{k} must be a positive integer, got {v!r}", path)
        elif v is not d and k in _OPTIONAL_FLOATS and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InputError(f"GGUF key {arch}.{k} must be a number, got {v!r}", path)
        return v

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedError("this GGUF carries rope_freqs (Llama-3 rope scaling) without its original parameters", path)
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    cfg = {"model_type": model_type, "architectures": [hf_class],
           "hidden_size": hidden, "intermediate_size": int(g("feed_forward_length")),
           "num_hidden_layers": int(g("block_count")), "num_attention_heads": heads,
           "num_key_value_heads": int(g("attention.head_count_kv", heads)),
           "head_dim": int(g("attention.key_length", g("rope.dimension_count", hidden // heads))),
           "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
           "rope_theta": float(g("rope.freq_base", 10000.0)),
           "max_position_embeddings": int(g("context_length", 2048)),
           "vocab_size": int(g("vocab_size", len(tokens))),
           "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
           "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"), "dtype": "float32"}
    if extra is not None:
        cfg.update(extra(g, names, lambda k: field(reader, k)))
        if cfg.get("rope_theta") is None:
            cfg.pop("rope_theta", None)  # the base sits in rope_parameters (gpt-oss)
    if g("rope.scaling.type") == "linear":
        factor = g("rope.scaling.factor")
        if factor is None:
            raise InputError(f"GGUF key {arch}.rope.scaling.type is linear but {arch}.rope.scaling.factor is missing", path)
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return cfg


def _rounded(x: torch.Tensor, dtype: torch.dtype, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded to the output ``dtype`` (into ``out`` when given), refusing an overflow (exit 3)."""
    y = x.to(dtype) if out is None else out.copy_(x)
    if y.dtype == torch.float16:
        check_output_finite(y, name, "float16", "import with --dtype bf16 or fp32")
    return y


def _import_rows(wr, hf: str, t, spec, path) -> None:
    """An F16/F32 GGUF tensor that llama.cpp takes as stored, converted to the checkpoint's dtype a
    block of rows at a time straight from the mapped file (the bytes of dequantize + .to(dtype):
    both conversions are exact or round once)."""
    import warnings as _w

    rows, cols = spec.shape
    a = t.data.reshape(rows, cols)
    with _w.catch_warnings():
        _w.simplefilter("ignore", UserWarning)  # a read-only map: only read here
        whole = torch.from_numpy(a)
    check_finite(whole, t.name, path)  # one aminmax over the mapped file
    step = max(1, BLOCK_BYTES // (4 * cols))
    for r0 in range(0, rows, step):
        src = whole[r0:r0 + step]
        wr.write_rows(hf, r0, _rounded(src, spec.dtype, hf, _BUF.get(src.shape, spec.dtype)))


def text_only_config(cfgd: dict, model_type: str, architecture: str) -> dict:
    """The text model's own config.json from a multimodal one (hyper-parameters under text_config)."""
    out = {k: v for k, v in cfgd["text_config"].items()}
    for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        if k in cfgd and k not in out:
            out[k] = cfgd[k]
    out.update(model_type=model_type, architectures=[architecture])
    return out


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto", overwrite: bool = False,
                quiet: bool = True) -> dict:
    """GGUF → HF checkpoint folder (safetensors, config.json, tokenizer files)."""
    from ..ops.common import progress
    from .. import st
    from . import gguf_vocab

    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    check_output(out, [path], overwrite)
    reader = open_gguf(path)
    cfgd = config_from_gguf(reader, path)
    cfg = parse_config(cfgd, path)
    fam = gguf_arch.family(cfg, path)
    if fam.import_as is not None:  # a multimodal source: the GGUF holds its text model, imported as that
        cfgd = text_only_config(cfgd, *fam.import_as)
        cfg = parse_config(cfgd, path)
    inverse = {v: k for k, v in name_map(cfg).items()}
    generated = {g for g, _ in fam.extra}
    if cfg.tie_word_embeddings and fam.output == "required":
        generated.add("output.weight")  # the tied head, written twice for llama.cpp
    tensors = {t.name: t for t in reader.tensors}
    kinds = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    if dtype == "auto":
        dt = torch.float16 if kinds == {Q.F16} else torch.bfloat16 if kinds == {Q.BF16} else torch.float32
    else:
        from ..ops.common import parse_dtype
        dt = parse_dtype(dtype, allow_keep=False)

    def deq(t, data=None, shape=None):
        try:
            a = gguf.quants.dequantize(t.data if data is None else data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise UnsupportedError(f"tensor {t.name!r}: cannot dequantize {t.tensor_type.name}: {e}", path) from e
        x = torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
        return x.reshape(shape) if shape is not None else x

    mv = gguf_moe.moe_values(cfg, path)
    stacked = gguf_moe.unstack_plan(cfg, mv, tensors, deq, path) if mv is not None else []
    taken = {g for _, _, _, used in stacked for g in used}
    plan = []  # (hf name, shape, fp32 producer)
    for gname, t in tensors.items():
        if gname in generated or gname in taken:
            continue
        hf = inverse.get(gname)
        if hf is None:
            raise UnsupportedError(f"unexpected tensor {gname!r} for a {fam.arch} model", path)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if gname.endswith("ffn_gate_inp_shexp.weight") and len(shape) == 1:  # a vector (ours), (1, H) in transformers
            shape = (1,) + shape
        plan.append((hf, shape, lambda t=t, shape=shape: gguf_arch.from_gguf(fam, t.name, deq(t, shape=shape), cfg)))
    plan += [(hf, shape, make) for hf, shape, make, _ in stacked]
    gguf_names = {hf: g for hf, g in ((inverse.get(g), g) for g in tensors) if hf is not None}
    shapes = {hf: shape for hf, shape, _ in plan}
    if mv is None:
        check_fits(cfg, shapes, path)  # a missing or misshapen tensor: refuse, not a broken checkpoint
    else:
        _check_moe(cfg, mv, shapes, path)
    cfgd["dtype"] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dt]
    specs = [st.TensorInfo(hf, dt, shape) for hf, shape, _ in plan]
    files = gguf_vocab.tokenizer_files_from_gguf(reader.fields)
    check_space(out, sum(s.nbytes for s in specs), "the imported checkpoint")
    with CheckpointWriter(out, specs, config=cfgd) as wr, _closing(None):
        by_name = {spec.name: (entry, spec) for entry, spec in zip(plan, specs)}
        ordered = [by_name[s.name] for s in wr.file_order(specs)]  # each shard written front to back
        for (hf, shape, make), spec in progress(ordered, "import", quiet=quiet):
            t = tensors.get(gguf_names.get(hf))
            if STREAMED and t is not None and t.tensor_type in (Q.F16, Q.F32) and len(shape) == 2 and \
                    not gguf_arch.changes(fam, t.name, cfg):
                _import_rows(wr, hf, t, spec, path)  # stored as is: converted a block of rows at a time
                continue
            x = make()
            check_finite(x, t.name if t is not None else hf, path)
            wr.write(hf, _rounded(x, spec.dtype, hf))
        for name, text in files.items():
            (wr.tmp / name).write_text(text)
        gen = {k: v for k, v in (("bos_token_id", cfgd.get("bos_token_id")), ("eos_token_id", cfgd.get("eos_token_id"))) if v is not None}
        (wr.tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return {"gguf": str(path), "out": str(out), "arch": fam.arch, "tensors": len(plan), "dtype": str(dt),
            "quant_types": sorted(k.name for k in kinds)}
