"""The canonical per-expert view of a mixture-of-experts checkpoint.

Whatever layout the experts are stored in, loratools talks about them as ordinary 2-D weights,
one per expert and matrix, oriented (out, in) like nn.Linear and named as transformers saves
per-expert tensors (the MoeSpec docstring in arch/spec.py describes every layout):

    model.layers.L.mlp.experts.E.gate_proj.weight | up_proj | down_proj     (Qwen2/3-MoE, OLMoE)
    model.layers.L.block_sparse_moe.experts.E.w1.weight | w3 | w2           (Mixtral: block, leaves)
    model.layers.L.mlp.experts.E.gate_proj.weight | ...                     (gpt-oss: virtual)

Stored layouts read (found from the tensor names and shapes; the MoeSpec's fields say what the
names are, never the model_type):

    "per_expert"  one 2-D tensor per canonical weight (the identity)
    "fused"       transformers 5's in-memory layout saved to disk: ``<block>.experts.gate_up_proj``
                  (E, 2I, H) = cat(gate rows, up rows) and ``<block>.experts.down_proj`` (E, H, I)
                  (block "mlp" or the spec's block)
    "gpt_oss"     fused and transposed (E, in, out): ``gate_up_proj`` (E, H, 2I) with gate in
                  columns 0::2 and up in 1::2, ``down_proj`` (E, I, H)   (MoeSpec.disk_layout)
    "mxfp4"       gpt-oss's MXFP4 ``<t>_blocks`` (E, out, in/32, 16) uint8 (two e2m1 values a
                  byte, low nibble first) and ``<t>_scales`` (E, out, in/32) uint8 (e8m0: 2^(s-127)
                  per 32 values), dequantized on read to the logical ``<t>`` (E, in, out) of the
                  "gpt_oss" layout

The inverse is a ``Slot``: the stored tensor a canonical weight lives in (for MXFP4 the logical
``<t>`` name, which is what a merge writes back in bf16), the expert index along its first dim
(None for a 2-D per-expert tensor), the (rows, cols) selection of that expert's 2-D slab and
whether the slab holds W or Wᵀ. A merge reads one slab, adds every canonical delta that lands in
it, and writes it: expert by expert, never the whole 3-D stack.

Usage::

    from loratools.arch.experts import ExpertView
    view = ExpertView.of(ck)                       # ck: checkpoint.Checkpoint; empty for dense models
    for name, w in view.weights.items():           # canonical "....experts.3.gate_proj.weight"
        w.shape, w.layer, w.expert, w.part          # (out, in), 0, 3, "gate"
        W = view.read(ck, name)                     # (out, in) fp32 (dtype=None: stored dtype)
        s = w.slot                                  # Slot(tensor=..., expert=3, rows=..., cols=..., transposed=...)
    for tensor, e in view.slabs():                  # each stored slab once, by layer and expert
        slab = view.read_slab(ck, tensor, e)        # 2-D, one expert (fp32)
        for name in view.in_slab(tensor, e):        # the canonical weights it holds
            view.weights[name].slot.add_(slab, delta)   # slab[rows, cols] += delta (or deltaᵀ)
    view.resolve("model.layers.0.mlp.experts.3.w1")   # an alias (in-memory "mlp." block) -> canonical
                                                      # module name, or None when it is no expert

``ExpertView.from_shapes(shapes, config)`` builds the same view from {tensor name: shape} and
config.json (no files needed). The router (``<block>.<router>``) and Qwen2-MoE's shared expert
are ordinary 2-D tensors and are not part of the view.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

from ..errors import InputError
from .spec import MoeSpec

PARTS = ("gate", "up", "down")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32  # values that share one e8m0 scale


@dataclass(frozen=True)
class Slot:
    """Where one canonical (out, in) weight lives: ``W = slab[rows, cols]`` (``.T`` when
    ``transposed``), the slab being ``tensor[expert]`` (or ``tensor`` itself when expert is None).
    ``stored`` is "plain" or "mxfp4" (``tensor`` is then the logical name; the file holds
    ``tensor + "_blocks"`` / ``"_scales"``)."""

    tensor: str
    expert: int | None
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))
    transposed: bool = False
    stored: str = "plain"

    def take(self, slab: torch.Tensor) -> torch.Tensor:
        """This weight, (out, in), as a view of ``slab``."""
        v = slab[self.rows, self.cols]
        return v.t() if self.transposed else v

    def add_(self, slab: torch.Tensor, delta: torch.Tensor) -> None:
        """``slab += delta`` at this weight's place (delta (out, in), same dtype as slab)."""
        v = slab[self.rows, self.cols]
        v += delta.t() if self.transposed else delta


@dataclass(frozen=True)
class ExpertWeight:
    """One canonical per-expert weight: its name, layer, expert, part (gate / up / down), (out, in)
    shape and Slot."""

    name: str
    layer: int
    expert: int
    part: str
    shape: tuple
    slot: Slot


def _mxfp4_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(R, G, 16) uint8 blocks and (R, G) uint8 e8m0 scales -> (R, G·32) fp32, (out, in)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    out = torch.empty(*b.shape[:-1], b.shape[-1] * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(b & 0x0F).long()]
    out[..., 1::2] = lut[(b >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return out.reshape(b.shape[0], -1)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 ``*_blocks`` (..., R, G, 16) and ``*_scales`` (..., R, G) -> (..., G·32, R) fp32, the
    logical fused gpt-oss tensor (transformers' dequantization, one expert at a time)."""
    if blocks.dim() == 3:
        return _mxfp4_decode(blocks, scales).t()
    return torch.stack([mxfp4_dequantize(b, s) for b, s in zip(blocks, scales)])


@dataclass
class ExpertView:
    """Canonical per-expert weights of one checkpoint (see the module docstring), ordered by layer,
    expert and part (gate, up, down). Empty (falsy) when the checkpoint has no experts."""

    moe: MoeSpec | None
    weights: dict[str, ExpertWeight] = field(default_factory=dict)
    layout: dict[int, str] = field(default_factory=dict)        # layer -> "per_expert" | "fused" | "gpt_oss" | "mxfp4"
    num_experts: dict[int, int] = field(default_factory=dict)   # layer -> E
    stored: dict[str, str] = field(default_factory=dict)        # file tensor name -> the slab tensor it backs
    _slabs: dict = field(default_factory=dict, repr=False)      # (tensor, expert) -> [canonical names]
    _by_tensor: dict | None = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return bool(self.weights)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def of(cls, ck) -> "ExpertView":
        """The view of an open ``checkpoint.Checkpoint``."""
        return cls.from_shapes({k: tuple(ck.info(k).shape) for k in ck.keys()}, ck.config, ck.path)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple], config: Mapping | None, path=None) -> "ExpertView":
        """The view of a checkpoint with tensors ``shapes`` ({name: shape}) and ``config`` (config.json)."""
        from .registry import FAMILIES

        config = dict(config or {})
        spec = FAMILIES.get(config.get("model_type"))
        moe = spec.moe if spec is not None else None
        view = cls(moe)
        if moe is None:
            return view
        blocks = "|".join(re.escape(b) for b in dict.fromkeys((moe.block, "mlp")))
        leaves = "|".join(re.escape(x) for x in moe.leaves)
        per = re.compile(rf"^(?P<pre>.*layers\.(?P<L>\d+)\.)(?P<blk>{blocks})\.experts\.(?P<e>\d+)\.(?P<leaf>{leaves})\.weight$")
        fused = re.compile(rf"^(?P<pre>.*layers\.(?P<L>\d+)\.)(?P<blk>{blocks})\.experts\.(?P<t>gate_up_proj|down_proj)(?P<q>_blocks)?$")
        canon_block = moe.block
        part_of = dict(zip(moe.leaves, PARTS))
        transposed = moe.disk_layout == "gpt_oss"
        # transformers' configs alias the two spellings (Qwen3-MoE saves num_local_experts, published
        # checkpoints say num_experts): the spec's field first, then the other one
        key = next((k for k in (moe.experts, "num_experts", "num_local_experts") if k in config), moe.experts)
        expected = config.get(key)
        for name, shape in shapes.items():
            m = per.match(name)
            if m:
                L, e = int(m["L"]), int(m["e"])
                if len(shape) != 2:
                    raise InputError(f"expert tensor {name!r} has shape {tuple(shape)}, expected 2-D", path)
                cname = f"{m['pre']}{canon_block}.experts.{e}.{m['leaf']}.weight"
                view._add(cname, L, e, part_of[m["leaf"]], tuple(shape), Slot(name, None), "per_expert", path)
                view.stored[name] = name
                continue
            m = fused.match(name)
            if not m:
                continue
            L, t, pre = int(m["L"]), m["t"], m["pre"]
            logical = name[: -len("_blocks")] if m["q"] else name
            if m["q"]:
                scales = logical + "_scales"
                if scales not in shapes:
                    raise InputError(f"MXFP4 tensor {name!r} has no {scales!r}", path)
                if len(shape) != 4 or shape[-1] * 2 != MXFP4_BLOCK or tuple(shapes[scales]) != tuple(shape[:3]):
                    raise InputError(f"MXFP4 tensors {name!r} {tuple(shape)} / {scales!r} {tuple(shapes[scales])} "
                                     "are not (E, out, in/32, 16) / (E, out, in/32)", path)
                E, n_out, n_in = shape[0], shape[1], shape[2] * MXFP4_BLOCK
                kind, stored, is_t = "mxfp4", "mxfp4", True
                view.stored[name] = view.stored[scales] = logical
            else:
                if len(shape) != 3:
                    raise InputError(f"fused expert tensor {name!r} has shape {tuple(shape)}, expected 3-D", path)
                E = shape[0]
                n_in, n_out = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
                kind, stored, is_t = ("gpt_oss" if transposed else "fused"), "plain", transposed
                view.stored[name] = name
            base = f"{pre}{canon_block}.experts."
            if t == "down_proj":
                parts = (("down", slice(None)),)
            elif n_out % 2:
                raise InputError(f"fused gate/up tensor {name!r} has an odd output width {n_out}", path)
            elif is_t:      # interleaved: gate = out 0::2, up = out 1::2
                parts = (("gate", slice(0, None, 2)), ("up", slice(1, None, 2)))
            else:           # cat(gate rows, up rows)
                parts = (("gate", slice(0, n_out // 2)), ("up", slice(n_out // 2, None)))
            for e in range(E):
                for part, sel in parts:
                    width = n_out if part == "down" else n_out // 2
                    slot = Slot(logical, e, slice(None), sel, True, stored) if is_t else Slot(logical, e, sel)
                    leaf = moe.leaves[PARTS.index(part)]
                    view._add(f"{base}{e}.{leaf}.weight", L, e, part, (width, n_in), slot, kind, path)
        order = sorted(view.weights.values(), key=lambda w: (w.layer, w.expert, PARTS.index(w.part)))
        view.weights = {w.name: w for w in order}
        view._slabs = {k: view._slabs[k] for k in dict.fromkeys((w.slot.tensor, w.slot.expert) for w in order)}
        for L in sorted(view.layout):
            E = view.num_experts[L]
            have = {(w.expert, w.part) for w in view.weights.values() if w.layer == L}
            missing = [f"{e}.{p}" for e in range(E) for p in PARTS if (e, p) not in have]
            if missing:
                raise InputError(f"layer {L}: expert weights missing ({', '.join(missing[:4])}"
                                 f"{', ...' if len(missing) > 4 else ''})", path)
            if isinstance(expected, int) and E != expected:
                raise InputError(f"layer {L} has {E} experts but config.json says {key}={expected}", path)
        return view

    def _add(self, cname, L, e, part, shape, slot, kind, path):
        if cname in self.weights:
            raise InputError(f"expert weight {cname!r} is stored twice ({self.weights[cname].slot.tensor} and "
                             f"{slot.tensor})", path)
        if self.layout.setdefault(L, kind) != kind:
            raise InputError(f"layer {L} stores experts in two layouts ({self.layout[L]} and {kind})", path)
        self.weights[cname] = ExpertWeight(cname, L, e, part, shape, slot)
        self.num_experts[L] = max(self.num_experts.get(L, 0), e + 1)
        self._slabs.setdefault((slot.tensor, slot.expert), []).append(cname)

    # -- queries --------------------------------------------------------------------------------
    def covers(self, tensor: str) -> bool:
        """Whether a stored tensor name (including ``*_blocks`` / ``*_scales``) holds expert weights."""
        return tensor in self.stored

    def slabs(self) -> Iterator[tuple[str, int | None]]:
        """Every (slab tensor, expert) once, by layer then expert (gate, up, down)."""
        return iter(list(self._slabs))

    def slabs_of(self, tensor: str) -> list[int | None]:
        """The experts (slab indices) of one slab tensor ([None] for a 2-D per-expert tensor)."""
        if self._by_tensor is None:
            self._by_tensor = {}
            for t, e in self._slabs:
                self._by_tensor.setdefault(t, []).append(e)
        return list(self._by_tensor.get(tensor, ()))

    def in_slab(self, tensor: str, expert: int | None) -> list[str]:
        """The canonical weight names held by one slab."""
        return list(self._slabs.get((tensor, expert), ()))

    def resolve(self, module: str) -> str | None:
        """The canonical module name (no ``.weight``) of an expert module name in any known spelling
        (canonical, or with the block spelled "mlp" / the spec's block); None when it is not an
        expert weight of this checkpoint."""
        if self.moe is None:
            return None
        name = module[: -len(".weight")] if module.endswith(".weight") else module
        if name + ".weight" in self.weights:
            return name
        for a, b in ((".mlp.experts.", f".{self.moe.block}.experts."), (f".{self.moe.block}.experts.", ".mlp.experts.")):
            if a in name and name.replace(a, b, 1) + ".weight" in self.weights:
                return name.replace(a, b, 1)
        return None

    def is_expert_name(self, module: str) -> bool:
        """Whether ``module`` is spelled like a per-expert module (``...experts.<n>.<leaf>``) of this
        family, existing or not (to name adapter modules that land nowhere)."""
        if self.moe is None:
            return False
        return re.search(rf"\.experts\.\d+\.({'|'.join(map(re.escape, self.moe.leaves))})(\.weight)?$", module) is not None

    def read_slab(self, ck, tensor: str, expert: int | None, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One stored slab (2-D): the per-expert tensor, or expert ``expert`` of a fused tensor (MXFP4
        dequantized to its logical (in, out) slab, fp32). Reads only that expert's bytes where the
        shard is safetensors. A fresh tensor (safe to modify)."""
        names = self._slabs.get((tensor, expert))
        if not names:
            raise KeyError(f"no expert slab {tensor!r}[{expert}]")
        if self.weights[names[0]].slot.stored == "mxfp4":
            slab = mxfp4_dequantize(ck.get_mapped(tensor + "_blocks")[expert], ck.get_mapped(tensor + "_scales")[expert])
            return slab if dtype in (None, torch.float32) else slab.to(dtype)
        t = ck.get_mapped(tensor) if expert is not None else ck.get(tensor)
        t = t[expert] if expert is not None else t
        return t.to(dtype, copy=True) if dtype is not None else t.clone()

    def read(self, ck, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Canonical weight ``name`` (``.weight`` optional), (out, in), contiguous; ``dtype=None``:
        the stored dtype (fp32 for MXFP4)."""
        w = self.weights[name if name.endswith(".weight") else name + ".weight"]
        return w.slot.take(self.read_slab(ck, w.slot.tensor, w.slot.expert, dtype)).contiguous()

    def stored_dtype(self, ck, tensor: str) -> torch.dtype:
        """dtype of a slab tensor as stored (MXFP4: torch.uint8)."""
        return ck.info(tensor + "_blocks" if tensor not in ck else tensor).dtype


    # -- adapters against this view -----------------------------------------------------------
    def shapes(self) -> dict[str, tuple]:
        """{canonical weight name: (out, in)}, to check adapters against."""
        return {n: w.shape for n, w in self.weights.items()}

    def align(self, adapter):
        """``adapter`` with expert module names in their canonical spelling (the same object when
        nothing changes)."""
        from dataclasses import replace

        mods = {(self.resolve(n) or n): m for n, m in adapter.modules.items()}
        return adapter if list(mods) == list(adapter.modules) else replace(adapter, modules=mods)

    def describe(self) -> str:
        """E per MoE layer, in words ("4 experts in each of layers 0, 1")."""
        if not self.num_experts:
            return "no experts"
        by: dict[int, list] = {}
        for L, E in self.num_experts.items():
            by.setdefault(E, []).append(L)
        return "; ".join(f"{E} experts in each of layers {', '.join(map(str, Ls))}" for E, Ls in by.items())


EXPERT_NAME = re.compile(r"\.experts\.\d+\.[^.]+$|\.experts\.(gate_up_proj|down_proj)$")


def check_targets(adapters, shapes: Mapping[str, tuple], view: "ExpertView", where: str) -> None:
    """Every module of every adapter must land on a weight in ``shapes`` (tensor name -> shape, the
    canonical expert weights included). Modules that land nowhere are refused in one line naming
    them all (IncompatibleError), with the experts the base has when expert modules are among
    them. Dense adapters that miss are left to ``Adapter.check_against`` (its message)."""
    from ..errors import IncompatibleError

    miss = [(a, n) for a in adapters for n in a.modules if f"{n}.weight" not in shapes]
    experts = [n for _, n in miss if EXPERT_NAME.search(n) or view.is_expert_name(n)]
    if not experts:
        return
    names = [n for _, n in miss]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    has = view.describe() if view else "no mixture-of-experts layers"
    raise IncompatibleError(f"the {where} does not have {len(names)} module(s) the adapter targets ({has}): {shown}",
                            miss[0][0].source or None)


def expert_view(ck) -> ExpertView:
    """``ExpertView.of(ck)``."""
    return ExpertView.of(ck)
