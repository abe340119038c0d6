"""GGUF models for llama.cpp: export an HF checkpoint (adapters merged on the fly) and import
a GGUF back into an HF checkpoint.

Export is a plain sequence: hyper-parameter and tokenizer key-values, the tensor infos (all
known from the checkpoint headers), then the tensor data, one tensor at a time — read, merged
(``MergedView``), permuted, quantized, written. Peak memory is a few copies of one tensor.

Per-architecture facts live in ARCHS. llama.cpp's ``llama`` architecture uses the interleaved
rope layout, so Q and K rows are permuted per head (``permute_qk``); qwen2/qwen3 use the NeoX
layout and are written as they are. Norms, biases and other 1-D tensors stay F32.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..adapter import Adapter
from ..checkpoint import Checkpoint, CheckpointWriter
from ..errors import IncompatibleError, InputError, LoratoolsError, UnsupportedError
from ..fsutil import atomic_file, check_output, check_space
from ..models.config import ModelConfig, load_config, parse_config
from ..models.decoder import DecoderLM, check_fits

SOURCE_CONFIG_KEY = "loratools.source_config"


@dataclass(frozen=True)
class GgufArch:
    name: str          # general.architecture
    permute_qk: bool   # llama.cpp's rope layout differs from HF's: permute Q/K rows


ARCHS = {"llama": GgufArch("llama", True), "mistral": GgufArch("llama", True),
         "qwen2": GgufArch("qwen2", False), "qwen3": GgufArch("qwen3", False)}
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
            "q5_0": "Q5_0", "q5_1": "Q5_1"}
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}


def _gguf():
    import gguf

    return gguf


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half layout → llama.cpp interleaved layout: within each head, rows
    [0..d/2) and [d/2..d) are interleaved (row i of the first half, then row i of the second)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """HF tensor name → GGUF tensor name (``model.layers.0.self_attn.q_proj.weight`` →
    ``blk.0.attn_q.weight``) for every parameter of this config's model."""
    gguf = _gguf()
    arch = ARCHS[cfg.model_type]
    tmap = gguf.get_tensor_name_map(_arch_enum(arch.name), cfg.num_hidden_layers)
    with torch.device("meta"):
        names = [n for n, _ in DecoderLM(cfg).named_parameters(remove_duplicate=False)]
    out = {}
    for n in names:
        g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise UnsupportedError(f"no GGUF name for tensor {n!r} ({arch.name})")
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


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    a = t.detach().to(torch.float32).cpu().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype).view(np.uint8)


def write_hparams(w, cfg: ModelConfig, arch: GgufArch) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.raw.get("head_dim") is not None or cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch.name == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.rope_type == "linear":
        gguf = _gguf()
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def rope_freqs(cfg: ModelConfig) -> torch.Tensor | None:
    """Llama-3 rope scaling as llama.cpp takes it: a per-frequency divisor tensor."""
    if cfg.rope_type != "llama3":
        return None
    from ..models.config import rope_inv_freq

    d = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return (base / rope_inv_freq(cfg)).float()


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, adapters: Sequence[Adapter] = (),
                weights: Sequence[float] | None = None, outtype: str = "f16", pre: str | None = None,
                overwrite: bool = False, quiet: bool = True) -> dict:
    """Write ``model_dir`` (with ``adapters`` merged) as a llama.cpp GGUF model."""
    from ..ops.common import progress
    from ..ops.merge import MergedView
    from . import gguf_vocab

    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise LoratoolsError(f"unknown --outtype {outtype!r} (one of {', '.join(OUTTYPES)})")
    qname = OUTTYPES[outtype]
    check_output(out, [model_dir] + [a.source for a in adapters if a.source], overwrite)
    cfg = load_config(model_dir)
    if cfg.model_type not in ARCHS:
        raise UnsupportedError(f"no GGUF export for model_type {cfg.model_type!r}", model_dir)
    arch = ARCHS[cfg.model_type]
    report = {"model": str(model_dir), "out": str(out), "arch": arch.name, "outtype": outtype, "warnings": []}
    windows = {w for w in cfg.layer_windows if w is not None}
    if windows:
        report["warnings"].append(f"llama.cpp's {arch.name} architecture ignores sliding_window={min(windows)}: "
                                  f"its results differ from the source beyond {min(windows)} tokens")
    with Checkpoint.open(model_dir) as ck:
        view = MergedView(ck, adapters, weights)
        cfg = view.merged_cfg  # what is written: a lora_bias merge turns the family's bias switch on
        names = name_map(cfg)
        check_fits(cfg, {n: tuple(view.info(n).shape) for n in view.names()}, ck.path)  # llama.cpp would refuse the file
        if view.untie:
            raise UnsupportedError("the adapter changes only one side of tied embeddings; export the merged checkpoint "
                                   "(loratools merge) and convert that", model_dir)
        plan = []  # (gguf name, hf name or None, shape, qtype)
        for n in view.names():
            if view.tied is not None and n == view.tied[1]:
                continue  # llama.cpp uses token_embd when output.weight is absent
            if n not in names:
                raise UnsupportedError(f"tensor {n!r} has no place in a GGUF {arch.name} model", ck.path)
            shape = view.info(n).shape
            plan.append((names[n], n, shape, _qtype_for(n, shape, qname)))
        rf = rope_freqs(cfg)
        if rf is not None:
            plan.append(("rope_freqs.weight", None, tuple(rf.shape), gguf.GGMLQuantizationType.F32))
        w = gguf.GGUFWriter(None, arch.name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(Path(model_dir).resolve().name)
        write_hparams(w, cfg, arch)
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[qname]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        report["tokenizer"] = gguf_vocab.add_tokenizer(w, Path(model_dir), cfg.vocab_size, pre)
        w.add_string(SOURCE_CONFIG_KEY, json.dumps(cfg.raw, sort_keys=True))
        nbytes = 0
        for gname, _, shape, q in plan:
            ishape, idtype, n, raw = _info_args(shape, q)
            w.add_tensor_info(gname, ishape, idtype, n, raw_dtype=raw)
            nbytes += n
        check_space(out, nbytes, "the GGUF file")
        with atomic_file(out) as tmp:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for gname, hf, shape, q in progress(plan, "gguf", quiet=quiet):
                t = rf if hf is None else view.tensor(hf).float()
                if arch.permute_qk and hf and ".self_attn.q_proj." in hf:
                    t = permute_qk(t, cfg.num_attention_heads)
                elif arch.permute_qk and hf and ".self_attn.k_proj." in hf:
                    t = permute_qk(t, cfg.num_key_value_heads)
                w.write_tensor_data(_encode(t, q))
            w.close()
    report["tensors"] = len(plan)
    for msg in report["warnings"]:
        warnings.warn(msg, stacklevel=2)
    return report


# -- import --------------------------------------------------------------------------------
_REQUIRED_INTS = ("attention.head_count", "embedding_length", "feed_forward_length", "block_count")
_OPTIONAL_INTS = ("attention.head_count_kv", "attention.key_length", "rope.dimension_count", "context_length", "vocab_size")
_OPTIONAL_FLOATS = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor")

def field(reader, key: str, default=None):
    """A GGUF key's Python value (gguf_vocab's reader of fields), or ``default``."""
    from .gguf_vocab import gguf_field_value

    f = reader.fields.get(key)
    return default if f is None else gguf_field_value(f)


def _precheck(path: Path) -> None:
    """Header sanity before gguf-py parses anything: magic, version, and counts the file can hold."""
    from .gguf_header import read_header

    read_header(path)


def open_gguf(path: str | os.PathLike):
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    _precheck(path)
    try:
        reader = gguf.GGUFReader(path)
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
    if arch not in ("llama", "qwen2", "qwen3"):
        raise UnsupportedError(f"GGUF architecture {arch!r} cannot be imported (llama, qwen2, qwen3)", path)

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
    cfg = {"model_type": arch, "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                  "qwen3": "Qwen3ForCausalLM"}[arch]],
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
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None)
    if g("rope.scaling.type") == "linear":
        factor = g("rope.scaling.factor")
        if factor is None:
            raise InputError(f"GGUF key {arch}.rope.scaling.type is linear but {arch}.rope.scaling.factor is missing", path)
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return cfg


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
    arch = ARCHS[cfg.model_type]
    inverse = {v: k for k, v in name_map(cfg).items()}
    tensors = {t.name: t for t in reader.tensors}
    kinds = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    if dtype == "auto":
        dt = torch.float16 if kinds == {Q.F16} else torch.bfloat16 if kinds == {Q.BF16} else torch.float32
    else:
        from ..ops.common import parse_dtype
        dt = parse_dtype(dtype, allow_keep=False)
    plan = []
    for gname, t in tensors.items():
        if gname == "rope_freqs.weight":
            continue
        hf = inverse.get(gname)
        if hf is None:
            raise UnsupportedError(f"unexpected tensor {gname!r} for a {arch.name} model", path)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        plan.append((hf, t, shape))
    check_fits(cfg, {hf: shape for hf, _, shape in plan}, path)  # a missing or misshapen tensor: refuse, not a broken checkpoint
    cfgd["dtype"] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dt]
    specs = [st.TensorInfo(hf, dt, shape) for hf, _, shape in plan]
    files = gguf_vocab.tokenizer_files_from_gguf(reader.fields)
    check_space(out, sum(s.nbytes for s in specs), "the imported checkpoint")
    with CheckpointWriter(out, specs, config=cfgd) as wr:
        for (hf, t, shape), spec in progress(list(zip(plan, specs)), "import", quiet=quiet):
            try:
                a = gguf.quants.dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise UnsupportedError(f"tensor {t.name!r}: cannot dequantize {t.tensor_type.name}: {e}", path) from e
            x = torch.from_numpy(np.array(a, dtype=np.float32, copy=True)).reshape(shape)
            if arch.permute_qk and ".self_attn.q_proj." in hf:
                x = unpermute_qk(x, cfg.num_attention_heads)
            elif arch.permute_qk and ".self_attn.k_proj." in hf:
                x = unpermute_qk(x, cfg.num_key_value_heads)
            wr.write(hf, x.to(spec.dtype))
        for name, text in files.items():
            (wr.tmp / name).write_text(text)
        gen = {k: v for k, v in (("bos_token_id", cfgd.get("bos_token_id")), ("eos_token_id", cfgd.get("eos_token_id"))) if v is not None}
        (wr.tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return {"gguf": str(path), "out": str(out), "arch": arch.name, "tensors": len(plan), "dtype": str(dt),
            "quant_types": sorted(k.name for k in kinds)}
