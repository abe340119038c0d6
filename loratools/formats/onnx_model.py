"""ONNX models for ONNX Runtime, exported from loratools' reference decoder.

IO names are the ones Optimum and onnxruntime-genai use: inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads,
past_len, head_dim); outputs ``logits``, ``present.{i}.key`` / ``.value``. Batch, sequence and
past axes are dynamic (past may be 0, sequence may be 1).

LoRA slots (``lora_slots``): every targeted linear layer computes ``W x + B (A x)`` where
``{module}.lora_A`` (r × in) and ``{module}.lora_B`` (out × r) are graph inputs with an empty
default initializer (r = 0) and a dynamic rank axis: fed nothing, the model is the base model;
fed an adapter (``.onnx_adapter``, scales folded into B) through RunOptions, it is base + adapter.
A fused ``qkv_proj`` / ``gate_up_proj`` is one slot, as in the checkpoint and in PEFT.

The graph is the reference decoder traced with plain-op attention, so every family switch is in
it as the decoder computes it: soft-capping (tanh), GELU-tanh, embedding scaling, the attention
scale, sandwich / post norms and the (1 + w) offset, Granite's multipliers, a rope table per
distinct rope (per layer type; none on NoPE layers; partial rotary), an additive mask per
distinct sliding window, and a KV cache for each layer (kv heads and head_dim per layer; the
caches hold every position, the window is in the mask).

Mixture-of-experts models: each expert matrix is a weight (and a possible LoRA slot) of its own,
under its canonical per-expert name (``model.layers.L.mlp.experts.E.gate_proj``), read one expert
at a time from any stored layout (per-expert, fused, gpt-oss's interleaved, MXFP4 dequantized). The
graph routes as the decoder does (TopK, softmax) and runs every expert on every token, weighted
by the routing weights scattered into a (tokens, experts) matrix (zero for the unselected ones):
exact and free of data-dependent shapes, at E / k times the expert compute of a gathered run.

LongRoPE: the graph holds both factor sets and chooses per call, from the furthest position
(max(position_ids) + 1 > original_max_position_embeddings: long), as transformers' forward does.
Keys cached under the short factors stay so; transformers' generate recomputes the cache once
when the sequence grows past the original length, and so does ``runtimes.onnxruntime.Runner``
(the switch point is in the model's metadata, ``longrope_original_max_position_embeddings``).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..adapter import Adapter
from ..checkpoint import copy_aux_files
from ..errors import IncompatibleError, InputError, LoratoolsError, UnsupportedError
from ..fsutil import SeqFile, atomic_dir, atomic_file, check_output, check_space, fsync_path
from ..models.config import load_config
from ..ops.common import check_output_finite, is_finite
from ..models.decoder import LoraSlot
from ..ops.common import progress, stage

TWO_GB = 2 * 1024**3
FAST = True  # False: the placeholders' products are computed while tracing and shape inference reads them (same bytes, slower)
COPY_BLOCK_ELEMS = 1 << 24  # an unchanged tensor is converted this many elements (whole rows) at a time


def slot_names(module: str) -> tuple[str, str]:
    return f"{module}.lora_A", f"{module}.lora_B"


class _Exportable(torch.nn.Module):
    """The traced function: (input_ids, attention_mask, position_ids, *past, *slots) ->
    (logits, *presents). ``cached``: the layers that keep their own KV cache, in order (a
    layer that reuses another layer's keys and values has no cache of its own)."""

    def __init__(self, model, cached: list[int] | None, slots: list[str]):
        super().__init__()
        self.model, self.cached, self.slots = model, cached, slots
        self.n = model.cfg.num_hidden_layers
        self.mods = model.linear_modules()

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        with _NoProducts() if FAST else contextlib.nullcontext():
            return self._forward(input_ids, attention_mask, position_ids, *rest)

    def _forward(self, input_ids, attention_mask, position_ids, *rest):
        past = None
        if self.cached is not None:
            past = [None] * self.n
            for j, i in enumerate(self.cached):
                past[i] = (rest[2 * j], rest[2 * j + 1])
            rest = rest[2 * len(self.cached):]
        for i, name in enumerate(self.slots):
            self.mods[name].loras = [LoraSlot(rest[2 * i], rest[2 * i + 1], 1.0)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, past)
        if self.cached is None:
            return logits
        return (logits, *[t for i in self.cached for t in presents[i]])


def _cache_layout(model) -> list[tuple[int, int, int]]:
    """(layer, kv heads, head_dim) of each layer that keeps a KV cache of its own, as its
    attention module is built (kv heads and head_dim may differ per layer type; a layer that
    attends to an earlier layer's keys and values, ``kv_source``, has none)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        att = layer.self_attn
        if getattr(att, "kv_source", None) is None:
            out.append((i, att.kv_heads, att.head_dim))
    return out


def _placeholder(k: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` that holds one number (the k-th smallest normal of ``dtype``, so no two
    placeholders are equal and the exporter cannot merge them) broadcast: no weight memory."""
    if dtype == torch.float16:
        one = torch.tensor(0x0400 + k, dtype=torch.int16).view(torch.float16)
    else:
        one = torch.tensor(0x00800000 + k, dtype=torch.int32).view(torch.float32).to(dtype)
    return one.expand(shape)


def _placeholder_model(cfg, view, tdt: torch.dtype):
    """The reference decoder with the shapes and ties of ``view``'s tensors and no weights: what
    the exporter traces. The weights are written afterwards, tensor by tensor. Returns the model
    and the on-disk name of each of its tensors (a multimodal checkpoint keeps the text decoder
    under another prefix; tensors outside the decoder are left out); for a mixture-of-experts
    model instead (shape, read) of each (decoder.model_tensors: canonical per-expert weights)."""
    from ..models.config import rope_inv_freq
    from ..models.decoder import DecoderLM, check_fits

    if cfg.moe is not None:  # experts as canonical per-expert weights, whatever their stored layout
        from ..models.decoder import model_tensors

        tensors = model_tensors(cfg, view.ck, merged=view)
        check_fits(cfg, {n: shape for n, (shape, _) in tensors.items()}, view.ck.path)
        with torch.device("meta"):
            model = DecoderLM(cfg)
        for k, (own, (shape, _)) in enumerate(tensors.items()):
            model._set(own, _placeholder(k, shape, tdt))
        disk = tensors
    else:
        names = view.names()
        check_fits(cfg, {n: tuple(view.info(n).shape) for n in names}, view.ck.path)
        with torch.device("meta"):
            model = DecoderLM(cfg)
        disk = {}
        for k, name in enumerate(names):
            own = cfg.to_internal(name)
            if own is not None and not name.endswith("rotary_emb.inv_freq"):
                disk[own] = name
                model._set(own, _placeholder(k, tuple(view.info(name).shape), tdt))
    if "lm_head.weight" not in disk or (cfg.tie_word_embeddings and not view.untie):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).float()
    model.requires_grad_(False)
    return model.eval(), disk


def _broadcast(t) -> bool:
    """A placeholder weight: more than one element, all of them one stored number."""
    return isinstance(t, torch.Tensor) and t.numel() > 1 and all(st == 0 for st in t.stride())


_PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "embedding")


class _NoProducts:
    """While tracing (``FAST``): no matrix product or embedding lookup is computed; each returns
    zeros of its shape and dtype. The tracer records the op above this level, from its inputs, so
    the graph is the same; only the traced values differ, and nothing in the decoder branches on
    them (placeholder weights have no meaningful values). This is where the old trace spent its
    time: GEMMs over every broadcast weight and products of subnormal values."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        products = {getattr(torch.ops.aten, n).default for n in _PRODUCTS}

        def meta(a):
            return torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor) else a

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in products:
                    out = func(*[meta(a) for a in args], **{k: meta(v) for k, v in kwargs.items()})
                    return torch.zeros(out.shape, dtype=out.dtype)
                return func(*args, **kwargs)

        self.mode = Mode()
        return self.mode.__enter__()

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@contextlib.contextmanager
def _shape_inference_without_placeholders():
    """The exporter's ONNX shape inference is given the parameters without the placeholder weights
    (``FAST``): with them it builds each weight into a temporary initializer (a full copy) to
    propagate values that only the weights' shapes, already on the graph inputs, decide."""
    orig = torch._C._jit_pass_onnx_graph_shape_type_inference

    def infer(graph, params, opset):
        return orig(graph, {k: v for k, v in params.items() if not _broadcast(v)}, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = infer
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = orig


def _weight_plan(proto, declared: set[str]) -> list[tuple[str, str, bool]]:
    """Turn the traced graph's weight inputs into initializers: (initializer name, model tensor
    name, stored transposed). A weight whose only use is a 2-D Transpose is stored transposed
    under the Transpose's output name and the node is dropped (what constant folding would do,
    without holding the weights); a weight used twice (a tied embedding: Gather and the head's
    Transpose) is stored once."""
    from onnx import helper

    users: dict[str, list] = {}
    for node in proto.graph.node:
        for x in node.input:
            users.setdefault(x, []).append(node)
    plan, drop = [], []
    for inp in [i for i in proto.graph.input if i.name not in declared]:
        key = inp.name.removeprefix("model.")
        use = users.get(inp.name, [])
        perm = None
        if len(use) == 1 and use[0].op_type == "Transpose":
            perm = [helper.get_attribute_value(a) for a in use[0].attribute if a.name == "perm"]
        if perm and list(perm[0]) == [1, 0]:
            plan.append((use[0].output[0], key, True))
            drop.append(use[0])
        else:
            plan.append((inp.name, key, False))
    keep_in = [i for i in proto.graph.input if i.name in declared]
    del proto.graph.input[:]
    proto.graph.input.extend(keep_in)
    keep_nodes = [n for n in proto.graph.node if not any(n is d for d in drop)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep_nodes)
    return plan


_ONNX_DTYPE = {torch.float32: 1, torch.float16: 10}  # TensorProto.FLOAT, FLOAT16


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _external_initializers(proto, specs, location: str) -> list[tuple[int, int]]:
    """Append initializers that point into ``location`` (page-aligned offsets); returns (offset,
    length) per spec."""
    from onnx import TensorProto

    spans, offset = [], 0
    for name, _, _, shape, dt in specs:
        n = math.prod(shape) * dt.itemsize
        offset += -offset % 4096
        tp = TensorProto(name=name, dims=list(shape), data_type=_ONNX_DTYPE[dt], data_location=TensorProto.EXTERNAL)
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(n))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        proto.graph.initializer.append(tp)
        spans.append((offset, n))
        offset += n
    return spans


def _pwrite(f, t, offset: int) -> None:
    """The bytes of the contiguous tensor (or bytes object) ``t`` at ``offset`` of the SeqFile ``f``."""
    f.pwrite(t if isinstance(t, bytes) else memoryview(t.reshape(-1).view(torch.uint8).numpy()), offset)


def _write_external(proto, specs, get, path: Path, quiet: bool = True, put=None) -> None:
    """model.onnx (the graph) + model.onnx_data (the weights, one tensor in memory at a time;
    ``put(fd, offset, spec)``: the streamed writer, a block of rows at a time, flushed to disk in the
    background as it goes)."""
    from ..fsutil import BackgroundSync

    data = path.with_name("model.onnx_data")
    spans = _external_initializers(proto, specs, data.name)
    if put is not None:
        with SeqFile(data) as f, BackgroundSync() as sync:  # front to back: large direct writes
            sync.add(f.sync_fd())
            with put:
                for spec, (offset, n) in progress(zip(specs, spans), "onnx: weights", len(specs), quiet):
                    put(f, offset, spec)
            f.truncate(spans[-1][0] + spans[-1][1] if spans else 0)
        fsync_path(data)
        path.write_bytes(proto.SerializeToString())
        return
    with open(data, "wb") as f:
        for (name, key, tr, shape, dt), (offset, n) in progress(zip(specs, spans), "onnx: weights", len(specs), quiet):
            t = get(key, tr)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dt, name
            f.seek(offset)
            f.write(t.view(torch.uint8).numpy())
            del t
        f.truncate(spans[-1][0] + spans[-1][1] if spans else 0)
        f.flush()
        os.fsync(f.fileno())
    path.write_bytes(proto.SerializeToString())


def _check_graph(proto, specs) -> None:
    """onnx.checker on the graph with its weights declared as external data in a sparse file (the
    checker never reads them), so the check holds no weights either."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="loratools-onnx-check-") as d:
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        spans = _external_initializers(m, specs, "weights.bin")
        with open(Path(d) / "weights.bin", "wb") as f:
            f.truncate(spans[-1][0] + spans[-1][1] if spans else 0)
        (Path(d) / "model.onnx").write_bytes(m.SerializeToString())
        onnx.checker.check_model(str(Path(d) / "model.onnx"))


def _write_inline(proto, specs, get, path: Path, quiet: bool = True, put=None) -> None:
    """One model.onnx: the graph, then each weight as a further top-level ModelProto holding one
    initializer (protobuf merges repeated messages on parsing, so the file reads as one model).
    The wire format is written by hand so a tensor's bytes go from its buffer to the file."""
    from onnx import TensorProto

    if put is not None:  # the same bytes at the same offsets, each tensor from the streamed writer
        from ..fsutil import BackgroundSync

        with SeqFile(path) as f, BackgroundSync() as sync:
            sync.add(f.sync_fd())
            graph = proto.SerializeToString()
            f.write(graph)
            offset = len(graph)
            with put:
                for spec in progress(specs, "onnx: weights", quiet=quiet):
                    name, key, tr, shape, dt = spec
                    nbytes = math.prod(shape) * dt.itemsize
                    head = TensorProto(name=name, dims=list(shape), data_type=_ONNX_DTYPE[dt]).SerializeToString()
                    tensor_len = len(head) + 1 + len(_varint(nbytes)) + nbytes
                    graph_len = 1 + len(_varint(tensor_len)) + tensor_len
                    pre = b"\x3a" + _varint(graph_len) + b"\x2a" + _varint(tensor_len) + head + b"\x4a" + _varint(nbytes)
                    put.raw(f, pre, offset)
                    put(f, offset + len(pre), spec)
                    offset += len(pre) + nbytes
        fsync_path(path)
        return
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        for name, key, tr, shape, dt in progress(specs, "onnx: weights", quiet=quiet):
            t = get(key, tr)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dt, name
            raw = t.view(torch.uint8).numpy()
            head = TensorProto(name=name, dims=list(shape), data_type=_ONNX_DTYPE[dt]).SerializeToString()
            tensor_len = len(head) + 1 + len(_varint(raw.nbytes)) + raw.nbytes  # field 9: raw_data
            graph_len = 1 + len(_varint(tensor_len)) + tensor_len               # GraphProto field 5: initializer
            f.write(b"\x3a" + _varint(graph_len))                               # ModelProto field 7: graph
            f.write(b"\x2a" + _varint(tensor_len) + head + b"\x4a" + _varint(raw.nbytes))
            f.write(raw)
            del t, raw
        f.flush()
        os.fsync(f.fileno())


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, adapters: Sequence[Adapter] = (),
                weights: Sequence[float] | None = None, dtype: str = "fp32", cache: bool = True,
                lora_slots: str | Sequence[str] | None = None, opset: int = 17, overwrite: bool = False,
                external_data_over: int = TWO_GB - 64 * 1024**2, quiet: bool = True) -> dict:
    """Write ``model_dir`` (adapters merged) as ``out_dir/model.onnx`` (+ ``model.onnx_data``
    when the weights pass ``external_data_over`` bytes, just under protobuf's 2 GB) with config
    and tokenizer files. ``lora_slots``: "all-linear" or a list of
    leaf names / module names that get LoRA inputs.

    Streaming: the exporter traces a model whose weights are broadcast placeholders (shapes and
    dtypes only), then each weight is read (and merged with the adapters) one at a time and
    written in its place."""
    import onnx

    from ..checkpoint import Checkpoint
    from ..ops.merge import MergedView

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in ("fp32", "fp16"):
        raise LoratoolsError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    check_output(out_dir, [model_dir] + [a.source for a in adapters if a.source], overwrite)
    cfg = load_config(model_dir)
    tdt = torch.float32 if dtype == "fp32" else torch.float16
    with Checkpoint.open(model_dir) as ck:
        check_space(out_dir, ck.num_parameters * (4 if dtype == "fp32" else 2) * 5 // 4, "the ONNX model")
        view = MergedView(ck, adapters, weights)  # it aligns PEFT names to the saved layout (multimodal Gemma 3)
        model, disk = _placeholder_model(view.merged_cfg, view, tdt)  # a lora_bias merge turns bias switches on
        model.set_explicit_attention(True)
        slots = _slot_modules(model, lora_slots)
        layout = _cache_layout(model) if cache else []
        wrapper = _Exportable(model, [i for i, _, _ in layout] if cache else None, slots).eval()
        L = cfg.num_hidden_layers
        b, s, p = 2, 3, 2
        args = [torch.ones(b, s, dtype=torch.long), torch.ones(b, (p if cache else 0) + s, dtype=torch.long),
                torch.arange(p if cache else 0, (p if cache else 0) + s)[None].expand(b, s).contiguous()]
        names_in = ["input_ids", "attention_mask", "position_ids"]
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        names_out = ["logits"]
        for i, kv_heads, head_dim in layout:
            for kind in ("key", "value"):
                args.append(torch.zeros(b, kv_heads, p, head_dim, dtype=tdt))
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
        stage(f"onnx: tracing the graph (opset {opset}, {'KV cache' if cache else 'no cache'}"
              + (f", {len(slots)} LoRA slots" if slots else "") + ")", quiet)
        with tempfile.TemporaryDirectory(prefix="loratools-onnx-") as work:
            raw = Path(work) / "model.onnx"
            import warnings
            with warnings.catch_warnings(), \
                    _shape_inference_without_placeholders() if FAST else contextlib.nullcontext():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, tuple(args), str(raw), dynamo=False, opset_version=opset,
                                  input_names=names_in, output_names=names_out, dynamic_axes=axes,
                                  export_params=False, do_constant_folding=False)
            proto = onnx.load(str(raw))
        plan = _weight_plan(proto, set(names_in))
        if slots:
            _add_slot_defaults(proto, slots, mods, tdt)
        proto.producer_name = "loratools"
        switch = longrope_switch(cfg)
        if switch is not None:
            e = proto.metadata_props.add()
            e.key, e.value = "longrope_original_max_position_embeddings", str(switch)
        # tensors the model computes itself (rope tables): written from its buffers, as they are
        buffers = {n: t.detach().contiguous() for n, t in model.named_buffers()}

        moe = cfg.moe is not None

        def get(key: str, transposed: bool) -> torch.Tensor:
            if key in buffers:
                t = buffers[key]
            else:  # fp32 math, rounded once (an unchanged tensor read from the file-backed map: no private copy)
                t = disk[key][1](None).to(tdt) if moe else view.tensor(disk[key], mapped=True).to(tdt)
                if t.dtype == torch.float16:  # finite inputs (MergedView checked them) beyond fp16: refused, named
                    check_output_finite(t, disk[key] if not moe else key, "float16", "export with --dtype fp32")
            t = (t.T if transposed else t).contiguous()
            return t.reshape(-1).view(t.shape)  # unit strides even on a size-1 dim (a (1, in) weight transposed)

        specs = []  # (initializer name, tensor, transposed, stored shape, dtype)
        for name, key, tr in plan:
            shape = tuple(buffers[key].shape) if key in buffers else \
                tuple(disk[key][0]) if moe else tuple(view.info(disk[key]).shape)
            specs.append((name, key, tr, shape[::-1] if tr else shape, buffers[key].dtype if key in buffers else tdt))
        big = sum(math.prod(sp[3]) * sp[4].itemsize for sp in specs) > external_data_over
        with atomic_dir(out_dir) as tmp:
            path = tmp / "model.onnx"
            put = _StreamedWriter(view, disk, get, buffers, moe) if FAST else None
            if big:
                _write_external(proto, specs, get, path, quiet, put)
                onnx.checker.check_model(str(path))  # by path: the weights are not loaded
            else:
                _check_graph(proto, specs)
                _write_inline(proto, specs, get, path, quiet, put)
            copy_aux_files(model_dir, tmp)
    return {"model": str(model_dir), "out": str(out_dir), "dtype": dtype, "cache": cache, "opset": opset,
            "layers": L, "lora_slots": slots, "external_data": big}


class _StreamedWriter:
    """``w(fd, offset, spec)``: write one stored tensor at ``offset`` the way ``get`` computes it
    (the same bytes), a block of rows at a time through reused buffers, so that neither a whole
    converted copy of a vocabulary-sized tensor nor its transpose is held; a writer thread writes
    one block while the next is computed (two buffer sets in turn). A plain merged weight
    (``MergedView.plain``) is computed in the row blocks of ``merge.row_blocks`` (exactly the whole
    product's rows); stored transposed, it is assembled whole in the output type when that fits
    ``2 * BLOCK_ELEMS``, else written as a column segment of each stored row. An unchanged 2-D
    tensor is converted from the file-backed map. Anything else (rope tables, experts, saved or
    DoRA tensors, pickle shards) is ``get`` whole. A block beyond float16: ``get`` raises the whole
    tensor's error. Use it as a context manager (the thread is joined on every exit path)."""

    def __init__(self, view, disk: dict, get, buffers: dict, moe: bool):
        from concurrent.futures import ThreadPoolExecutor

        from ..ops.merge import _Buffers

        self.view, self.disk, self.get, self.buffers, self.moe = view, disk, get, buffers, moe
        self.shared, self.bufs, self.turn = _Buffers(), [_Buffers(), _Buffers()], 0  # work; written in turn
        self.pending: list = [None, None]
        self.raws: list = []  # writes of small byte strings (inline framing), in order with the rest
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loratools-onnx-write")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            for f in self.pending + self.raws:
                if f is not None and exc[0] is None:
                    f.result()
        finally:
            self.pool.shutdown(wait=True)

    def raw(self, f, data: bytes, offset: int) -> None:
        """``data`` at ``offset`` of ``f``, written by the thread in turn with the tensors' blocks."""
        for r in self.raws:
            if r.done():
                r.result()  # a failed write raises here
        self.raws = [r for r in self.raws if not r.done()]
        self.raws.append(self.pool.submit(_pwrite, f, data, offset))

    def _buffers(self):
        """The next buffer set, once the writes from it are done."""
        self.turn ^= 1
        if self.pending[self.turn] is not None:
            self.pending[self.turn].result()
            self.pending[self.turn] = None
        return self.bufs[self.turn]

    def _write(self, f, parts: list) -> None:
        """(tensor, offset) pairs from the current buffer set, written to the SeqFile ``f`` by the thread."""
        def run():
            for t, off in parts:
                _pwrite(f, t, off)
        self.pending[self.turn] = self.pool.submit(run)

    def _rounded(self, bufs, src: torch.Tensor, key: str, tr: bool, dt: torch.dtype) -> torch.Tensor:
        """``src`` in ``dt``, contiguous, in ``bufs``; a transposed view is converted first and then
        transposed in the output type (a converting transpose is ten times slower)."""
        if src.dtype != dt and src.dim() == 2 and src.stride(0) == 1 and src.shape[1] > 1:
            src = self.shared.get(tuple(src.T.shape), dt, "conv").copy_(src.T).T
        out = bufs.get(tuple(src.shape), dt).copy_(src)
        if dt == torch.float16 and not is_finite(out):
            self.get(key, tr)  # raises the whole tensor's refusal (its count of overflowing values)
            raise AssertionError(key)
        return out

    def __call__(self, fd, offset: int, spec) -> None:
        from ..ops.merge import BLOCK_ELEMS, row_blocks

        view = self.view
        name, key, tr, shape, dt = spec
        src = None if self.moe or key in self.buffers else self.disk[key]
        base = None if src is None else view.source(src)
        isz = dt.itemsize
        if src is not None and view.plain(src):
            view.check_input(src, view.ck.get_mapped(base))
            rows, cols = view.info(src).shape
            blocks = row_blocks(rows, cols)
            whole = tr and len(blocks) > 1 and rows * cols <= 2 * BLOCK_ELEMS
            if whole:
                dst = self._buffers().get((cols, rows), dt, "whole")
            for r0, r1 in blocks:
                W = view.merge_rows(src, self.shared.get((r1 - r0, cols), torch.float32, "work"), r0, r1)
                if not tr:
                    self._write(fd, [(self._rounded(self._buffers(), W, key, tr, dt), offset + r0 * cols * isz)])
                elif whole:
                    dst[:, r0:r1].copy_(self._rounded(self.shared, W.T, key, tr, dt))
                elif len(blocks) == 1:
                    self._write(fd, [(self._rounded(self._buffers(), W.T, key, tr, dt), offset)])
                else:  # (cols, r1 - r0): a segment of each stored row
                    seg = self._rounded(self._buffers(), W.T, key, tr, dt)
                    self._write(fd, [(seg[c], offset + (c * rows + r0) * isz) for c in range(cols)])
            if whole:
                self._write(fd, [(dst, offset)])
            view.modified.append(src)
        elif base is not None and not view.changed(src) and base in view.ck and \
                len(view.ck.info(base).shape) == 2 and view.ck.safetensors_file(base) is not None:
            t = view.ck.get_mapped(base)
            view.check_input(src, t)
            o = t.T if tr else t
            step = max(1, COPY_BLOCK_ELEMS // max(1, o.shape[1]))
            for a in range(0, o.shape[0], step):
                self._write(fd, [(self._rounded(self._buffers(), o[a:a + step], key, tr, dt), offset + a * o.shape[1] * isz)])
        else:
            t = self.get(key, tr)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dt, name
            self._buffers()
            self._write(fd, [(t, offset)])


def longrope_switch(cfg) -> int | None:
    """The length past which LongRoPE takes its long factors (None: no LongRoPE layer)."""
    for r in cfg.layer_ropes if cfg.layers else ():
        if r is not None and r.rope_type == "longrope":
            return int(r.get("original_max_position_embeddings"))
    return None


def _slot_modules(model, spec) -> list[str]:
    """The blocks' linear layers that get LoRA inputs: "all-linear" (every one, fused qkv_proj /
    gate_up_proj included, as PEFT's all-linear) or a list of leaf or module names."""
    from ..models.decoder import Linear

    if not spec:
        return []
    wanted = None if spec == "all-linear" else set(spec) if not isinstance(spec, str) else set(spec.split(","))
    names = [n for n, m in model.named_modules() if isinstance(m, Linear) and n.startswith("model.layers.")
             and (wanted is None or n.rsplit(".", 1)[1] in wanted or n in wanted)]
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


def export_onnx_adapter(adapter: Adapter, out: str | os.PathLike, dtype: str = "fp32", overwrite: bool = False,
                        base: str | os.PathLike | None = None, check=None) -> dict:
    """ONNX Runtime's adapter format: ``{module}.lora_A`` = A, ``{module}.lora_B`` = s·B, under
    the slot names of the decoder's own layout (``model.layers.N...``; a fused ``qkv_proj`` /
    ``gate_up_proj`` is one slot, as in the checkpoint). ``base``: the base checkpoint or the
    slot model's folder (its config.json maps an on-disk layout such as a multimodal
    ``model.language_model.`` prefix to the slot names). ``check(path)``: run on the complete new
    file before it is renamed to ``out`` (a failure leaves ``out`` as it was)."""
    import onnxruntime as ort

    check_output(out, [adapter.source or None], overwrite, file=True)
    src = adapter.source or None
    if base is not None:
        from ..models.decoder import internal_adapter

        folder = Path(base).parent if Path(base).suffix == ".onnx" else Path(base)  # a slot model.onnx: its folder
        adapter = internal_adapter(load_config(folder), adapter)
    else:
        adapter = _slot_layout(adapter)
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
    with atomic_file(out, check=check) as tmp:
        fmt.export_adapter(str(tmp))
    return {"out": str(out), "modules": len(adapter.modules), "parameters": len(params), "dtype": dtype}


def _slot_layout(adapter: Adapter) -> Adapter:
    """``adapter`` with block module names in the decoder's own layout (the slot names), read
    from every family's on-disk and in-memory layouts (``model.language_model.layers.N...`` and
    ``language_model.model.layers.N...`` -> ``model.layers.N...``): no base model needed."""
    from dataclasses import replace

    from ..arch.registry import FAMILIES

    prefixes = sorted({p for spec in FAMILIES.values() for p, _ in spec.layouts() if p != "model."}, key=len, reverse=True)

    def own(name: str) -> str:
        for p in prefixes:
            if name.startswith(p + "layers."):
                return "model." + name[len(p):]
        return name

    mods = {own(n): m for n, m in adapter.modules.items()}
    return adapter if list(mods) == list(adapter.modules) else replace(adapter, modules=mods)


def check_adapter_fits(model_path: str | os.PathLike, adapter_path: str | os.PathLike) -> None:
    """Every adapter parameter must name a slot input of the model, with matching shapes."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path), load_external_data=False)
    inputs = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
              for i in m.graph.input}
    types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    try:
        params = ort.AdapterFormat.read_adapter(str(adapter_path)).get_parameters()
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for files it cannot parse
        raise InputError(f"not an ONNX Runtime adapter file ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         adapter_path) from None
    if not any(n.endswith(".lora_A") for n in types):
        raise IncompatibleError(f"{model_path} has no LoRA slots (export it with --lora-slots to feed adapters)", adapter_path)
    for name, val in params.items():
        if name not in inputs:
            raise IncompatibleError(f"adapter parameter {name!r} matches no LoRA slot of {model_path}", adapter_path)
        if val.element_type() != types[name]:
            got, want_t = (onnx.helper.tensor_dtype_to_np_dtype(t) for t in (val.element_type(), types[name]))
            raise IncompatibleError(f"adapter parameter {name!r} is {got} but the slot takes {want_t} "
                                    "(export the adapter with the model's --dtype)", adapter_path)
        shape = val.shape()
        want = inputs[name]
        if len(shape) != len(want) or any(w is not None and w != g for w, g in zip(want, shape)):
            raise IncompatibleError(f"adapter parameter {name!r} is {tuple(shape)} but the slot is {tuple(want)}", adapter_path)
    # each module's pair: both factors, one rank (A is r × in, B is out × r)
    for name in params:
        mod, _, part = name.rpartition(".lora_")
        other = f"{mod}.lora_{'B' if part == 'A' else 'A'}"
        if other not in params:
            raise IncompatibleError(f"adapter parameter {name!r} has no {other!r}", adapter_path)
        if part == "A" and params[name].shape()[0] != params[other].shape()[1]:
            raise IncompatibleError(f"adapter parameters of {mod!r} disagree on the rank ({params[name].shape()[0]} "
                                    f"vs {params[other].shape()[1]})", adapter_path)
