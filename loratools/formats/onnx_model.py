"""ONNX models for ONNX Runtime, exported from loratools' reference decoder.

IO names are the ones Optimum and onnxruntime-genai use: inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads,
past_len, head_dim); outputs ``logits``, ``present.{i}.key`` / ``.value``. Batch, sequence and
past axes are dynamic (past may be 0, sequence may be 1).

LoRA slots (``lora_slots``): every targeted linear layer computes ``W x + B (A x)`` where
``{module}.lora_A`` (r × in) and ``{module}.lora_B`` (out × r) are graph inputs with an empty
default initializer (r = 0) and a dynamic rank axis: fed nothing, the model is the base model;
fed an adapter (``.onnx_adapter``, scales folded into B) through RunOptions, it is base + adapter.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..adapter import Adapter
from ..checkpoint import copy_aux_files
from ..errors import IncompatibleError, LoratoolsError, UnsupportedError
from ..fsutil import atomic_dir, atomic_file, check_output, check_space
from ..models.config import load_config
from ..models.decoder import LoraSlot, load_model

TWO_GB = 2 * 1024**3
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def slot_names(module: str) -> tuple[str, str]:
    return f"{module}.lora_A", f"{module}.lora_B"


class _Exportable(torch.nn.Module):
    def __init__(self, model, cache: bool, slots: list[str]):
        super().__init__()
        self.model, self.cache, self.slots = model, cache, slots
        self.n = model.cfg.num_hidden_layers
        self.mods = model.linear_modules()

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        past = None
        if self.cache:
            past = [(rest[2 * i], rest[2 * i + 1]) for i in range(self.n)]
            rest = rest[2 * self.n:]
        for i, name in enumerate(self.slots):
            self.mods[name].loras = [LoraSlot(rest[2 * i], rest[2 * i + 1], 1.0)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, past)
        if not self.cache:
            return logits
        return (logits, *[t for kv in presents for t in kv])


def _merged_model_dir(model_dir: Path, adapters: Sequence[Adapter], weights, tmp: Path) -> Path:
    if not adapters:
        return model_dir
    from ..ops.merge import merge

    merge(model_dir, adapters, tmp / "merged", weights=weights, dtype=torch.float32, device="cpu")
    return tmp / "merged"


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, adapters: Sequence[Adapter] = (),
                weights: Sequence[float] | None = None, dtype: str = "fp32", cache: bool = True,
                lora_slots: str | Sequence[str] | None = None, opset: int = 17, overwrite: bool = False,
                external_data_over: int = TWO_GB - 64 * 1024**2) -> dict:
    """Write ``model_dir`` (adapters merged) as ``out_dir/model.onnx`` (+ ``model.onnx_data``
    when the weights pass ``external_data_over`` bytes, just under protobuf's 2 GB) with config
    and tokenizer files. ``lora_slots``: "all-linear" or a list of
    leaf names / module names that get LoRA inputs."""
    import onnx

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in ("fp32", "fp16"):
        raise LoratoolsError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    check_output(out_dir, [model_dir] + [a.source for a in adapters if a.source], overwrite)
    cfg = load_config(model_dir)
    tdt = torch.float32 if dtype == "fp32" else torch.float16
    from ..checkpoint import Checkpoint

    with Checkpoint.open(model_dir) as ck:
        check_space(out_dir, ck.num_parameters * (4 if dtype == "fp32" else 2) * 5 // 4, "the ONNX model")
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.work-") as work:
        work = Path(work)
        src = _merged_model_dir(model_dir, adapters, weights, work)
        model = load_model(src, dtype=tdt, device="cpu")
        model.set_explicit_attention(True)
        slots = _slot_modules(model, lora_slots)
        wrapper = _Exportable(model, cache, slots).eval()
        L, kvh, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        b, s, p = 2, 3, 2
        args = [torch.ones(b, s, dtype=torch.long), torch.ones(b, (p if cache else 0) + s, dtype=torch.long),
                torch.arange(p if cache else 0, (p if cache else 0) + s)[None].expand(b, s).contiguous()]
        names_in = ["input_ids", "attention_mask", "position_ids"]
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        names_out = ["logits"]
        if cache:
            for i in range(L):
                for kind in ("key", "value"):
                    args.append(torch.zeros(b, kvh, p, hd, dtype=tdt))
                    names_in.append(f"past_key_values.{i}.{kind}")
                    axes[names_in[-1]] = {0: "batch", 2: "past_sequence"}
                    names_out.append(f"present.{i}.{kind}")
                    axes[names_out[-1]] = {0: "batch", 2: "total_sequence"}
        mods = model.linear_modules()
        for j, name in enumerate(slots):
            out_f, in_f = mods[name].weight.shape
            a_name, b_name = slot_names(name)
            args += [torch.zeros(1, in_f, dtype=tdt), torch.zeros(out_f, 1, dtype=tdt)]
            names_in += [a_name, b_name]
            axes[a_name], axes[b_name] = {0: f"lora_rank_{j}"}, {1: f"lora_rank_{j}"}
        raw = work / "raw" / "model.onnx"
        raw.parent.mkdir()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(args), str(raw), dynamo=False, opset_version=opset,
                              input_names=names_in, output_names=names_out, dynamic_axes=axes,
                              do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
        if slots:
            _add_slot_defaults(proto, slots, mods, tdt)
        proto.producer_name = "loratools"
        big = sum(t.ByteSize() for t in proto.graph.initializer) > external_data_over
        with atomic_dir(out_dir) as tmp:
            path = tmp / "model.onnx"
            if big:
                onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location="model.onnx_data", size_threshold=1024)
            else:
                onnx.save_model(proto, str(path))
            onnx.checker.check_model(str(path))
            copy_aux_files(model_dir, tmp)
    return {"model": str(model_dir), "out": str(out_dir), "dtype": dtype, "cache": cache, "opset": opset,
            "layers": L, "lora_slots": slots, "external_data": big}


def _slot_modules(model, spec) -> list[str]:
    if not spec:
        return []
    leaves = LEAVES if spec == "all-linear" else tuple(spec) if not isinstance(spec, str) else tuple(spec.split(","))
    names = [n for n in model.linear_modules() if n.startswith("model.layers.")
             and (n.rsplit(".", 1)[1] in leaves or n in leaves)]
    if not names:
        raise LoratoolsError(f"--lora-slots {spec!r} matched no linear layer")
    return names


def _add_slot_defaults(proto, slots, mods, tdt) -> None:
    """Empty (rank 0) initializers with the slots' names: the inputs become optional."""
    from onnx import numpy_helper

    np_dt = np.float32 if tdt == torch.float32 else np.float16
    for name in slots:
        out_f, in_f = mods[name].weight.shape
        a_name, b_name = slot_names(name)
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros((0, in_f), np_dt), a_name))
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros((out_f, 0), np_dt), b_name))


def export_onnx_adapter(adapter: Adapter, out: str | os.PathLike, dtype: str = "fp32", overwrite: bool = False) -> dict:
    """ONNX Runtime's adapter format: ``{module}.lora_A`` = A, ``{module}.lora_B`` = s·B."""
    import onnxruntime as ort

    check_output(out, [adapter.source or None], overwrite)
    src = adapter.source or None
    if adapter.use_dora or adapter.modules_to_save or any(m.bias is not None for m in adapter.modules.values()):
        raise UnsupportedError("an ONNX Runtime adapter carries only A and B: DoRA, modules_to_save and lora_bias need a "
                               "merged export (loratools export onnx --adapter)", src)
    emb = [n for n, m in adapter.modules.items() if m.kind == "embedding" or not n.startswith("model.layers.")]
    if emb:
        raise UnsupportedError(f"module {emb[0]!r} has no LoRA slot in the exported model (slots are on the blocks' "
                               "linear layers); use a merged export", src)
    np_dt = np.float32 if dtype == "fp32" else np.float16
    params = {}
    for name, m in sorted(adapter.modules.items()):
        a_name, b_name = slot_names(name)
        params[a_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(m.A.float().numpy().astype(np_dt)))
        params[b_name] = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray((m.B.double() * m.scale).float().numpy().astype(np_dt)))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    with atomic_file(out) as tmp:
        fmt.export_adapter(str(tmp))
    return {"out": str(out), "modules": len(adapter.modules), "parameters": len(params), "dtype": dtype}


def check_adapter_fits(model_path: str | os.PathLike, adapter_path: str | os.PathLike) -> None:
    """Every adapter parameter must name a slot input of the model, with matching shapes."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path), load_external_data=False)
    inputs = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
              for i in m.graph.input}
    params = ort.AdapterFormat.read_adapter(str(adapter_path)).get_parameters()
    for name, val in params.items():
        if name not in inputs:
            raise IncompatibleError(f"adapter parameter {name!r} matches no LoRA slot of {model_path}", adapter_path)
        shape = val.shape()
        want = inputs[name]
        if any(w is not None and w != g for w, g in zip(want, shape)):
            raise IncompatibleError(f"adapter parameter {name!r} is {tuple(shape)} but the slot is {tuple(want)}", adapter_path)
