"""Merge adapters into base weights (and unmerge them), streamed tensor by tensor.

    W' = W + Σ wᵢ sᵢ Bᵢ Aᵢ          (embeddings: + Σ wᵢ sᵢ (Bᵢ Aᵢ)ᵀ; lora_bias: b' = b + Σ wᵢ sᵢ bᵢ)
    DoRA: W' = m / ‖W + s B A‖_row · (W + s B A)

computed in fp32 and rounded once to the output dtype. The output manifest (names, shapes,
dtypes) is known from the base's headers, so the sharded writer places every tensor as soon as
it is computed: peak memory is about one tensor, not one shard or one model.

Tied embeddings: when an adapter changes embed_tokens and lm_head of a tied model by exactly the
same delta (as ``extract`` writes them), the merged embedding is also the merged head: the tie is
kept (tie_word_embeddings stays true, only the embedding is written). When the two sides differ
(an adapter on one of them, or different deltas), the unmerged model uses the changed weight on
one side and another on the other; the merged checkpoint unties them (tie_word_embeddings=false,
lm_head.weight written, reported as ``untied_embeddings``) so that it computes the same thing.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Sequence

import torch

from .. import st
from ..adapter import Adapter
from ..checkpoint import Checkpoint, CheckpointWriter, DEFAULT_MAX_SHARD
from ..device import pick_device
from ..errors import IncompatibleError, UnsupportedError
from ..fsutil import check_output, check_space
from ..modelinfo import (bias_switch, bias_switches, embed_name, head_name, head_source, read_model_info, tied_pair,
                         with_tied_head)
from .common import CONFIG_DTYPE, check_finite, check_output_finite, progress


def equals_base(ck: Checkpoint, key: str, t: torch.Tensor, tied) -> bool:
    """Whether a saved whole tensor (modules_to_save) holds exactly the base's values (a tied
    model's lm_head is its embedding). ``tied``: the (embedding, head) pair of
    ``modelinfo.tied_pair``, or a bool (the checkpoint's own pair when true)."""
    if isinstance(tied, bool):
        emb = embed_name(ck.keys())
        tied = (emb, head_name(emb)) if tied and emb is not None else None
    src = key if key in ck else head_source(key, tied)
    if src not in ck or tuple(ck.info(src).shape) != tuple(t.shape):
        return False
    b = ck.get(src)
    return torch.equal(b, t.to(b.dtype)) and torch.equal(b.to(t.dtype), t)  # the same values, whatever the dtypes


class MergedView:
    """An open base checkpoint with adapters applied, tensor by tensor.

    ``names()`` lists the output tensors (the base's, plus ``lm_head.weight`` when a tied model
    must be untied, plus the zero biases a lora_bias merge turns on); ``source(name)`` is the base
    tensor it comes from; ``changed(name)`` says whether an adapter touches it; ``tensor(name)``
    computes it (fp32 when changed, else the stored tensor). Used by merge and by the exporters,
    so every sink merges the same way. It needs no architecture: only config.json's
    ``modelinfo`` facts (``self.model_info``); ``self.cfg`` is the full ModelConfig of the base, for the
    exporters, read on first use (it refuses a family loratools cannot run)."""

    def __init__(self, ck: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
                 sign: float = 1.0, device: str | torch.device = "cpu"):
        weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
        if len(weights) != len(adapters):
            raise IncompatibleError(f"{len(weights)} weights for {len(adapters)} adapters")
        self.ck, self.dev = ck, torch.device(device)
        self.model_info = read_model_info(ck.root)
        self.tied = tied_pair(self.model_info, ck.keys())
        self._cfg = None
        from ..arch.layout import align_adapter

        from ..arch.experts import ExpertView, check_targets

        # PEFT (in-memory) names vs the saved layout (multimodal Gemma 3, Mixtral's block_sparse_moe),
        # the tied head included; expert modules in their canonical per-expert names
        self.experts = ExpertView.of(ck)
        keys = with_tied_head({k: None for k in ck.keys()}, self.tied)
        adapters = [self.experts.align(align_adapter(a, keys)) for a in adapters]
        dora_mods = [n for a in adapters for n, m in a.modules.items() if m.magnitude is not None]
        touched = [n for a in adapters for n in a.modules]
        clash = [n for n in set(dora_mods) if touched.count(n) > 1]
        if clash:
            raise UnsupportedError(f"module {clash[0]!r} has a DoRA adapter and another adapter; merge them one at a time")
        self.saved: dict[str, torch.Tensor] = {}
        for a, w in zip(adapters, weights):
            for k, t in a.modules_to_save.items():
                if k in self.saved:
                    raise IncompatibleError(f"two adapters both replace {k!r} (modules_to_save)", a.source or None)
                # PEFT saves an embedding layer targeted by LoRA whole (save_embedding_layers) even when
                # it is unchanged: such a copy of the base tensor replaces nothing (and must not untie a head)
                if equals_base(ck, k, t, self.tied):
                    continue
                if w != 1.0:
                    raise IncompatibleError(f"an adapter with modules_to_save ({k!r}) cannot be weighted ({w:g}): its "
                                            "tensors replace the base's whole", a.source or None)
                self.saved[k] = t
        shapes = with_tied_head({k: ck.info(k).shape for k in ck.keys()}, self.tied)
        shapes.update(self.experts.shapes())
        check_targets(adapters, shapes, self.experts, f"base model {ck.path}")
        for a in adapters:
            for n, m in a.modules.items():
                if f"{n}.weight" in self.experts.weights and (m.magnitude is not None or m.bias is not None):
                    raise UnsupportedError(f"expert module {n!r} has a {'DoRA magnitude' if m.magnitude is not None else 'lora_B.bias'}: "
                                           "experts have no such LoRA (PEFT's target_parameters neither); it cannot be merged",
                                           a.source or None)
        self.added, self.switches = self._bias_switches(adapters, shapes)
        shapes.update({k: i.shape for k, i in self.added.items()})
        for a in adapters:
            a.check_against(shapes, f"base model {ck.path}", merging=True)
        self.updates: dict[str, list] = {}
        for a, w in zip(adapters, weights):
            for n, m in a.modules.items():
                self.updates.setdefault(f"{n}.weight", []).append((m, w * sign))
                if m.bias is not None:
                    self.updates.setdefault(f"{n}.bias", []).append((m, w * sign))
        # a tied model (even one that also stores lm_head.weight, which transformers then ignores)
        # stays tied when both sides receive the same change (then only the embedding is written and
        # the head computes with it); it is untied only when the merged embedding and head differ
        self.untie = self.tied is not None and any(k in self.updates or k in self.saved for k in self.tied) and \
            not self._same_change(*self.tied)
        self.modified: list[str] = []
        self._plan_experts()

    def _same_change(self, emb: str, head: str) -> bool:
        """Whether the tied embedding and head receive exactly the same change: the same saved tensor
        (or none) and, update for update, the same weight and LoRA delta, each side's in the orientation
        it uses (the embedding's ΔE = s·(B A)ᵀ; the head's ΔW = s'·B' A', so B' = Aᵀ, A' = Bᵀ and s' = s),
        with no DoRA magnitude or bias. Then the merged embedding equals the merged head."""
        se, sh = self.saved.get(emb), self.saved.get(head)
        if (se is None) != (sh is None) or (se is not None and not (se.shape == sh.shape and torch.equal(se, sh))):
            return False
        ue, uh = self.updates.get(emb, []), self.updates.get(head, [])
        if len(ue) != len(uh):
            return False
        for (me, we), (mh, wh) in zip(ue, uh):
            if we != wh or me.magnitude is not None or mh.magnitude is not None or me.scale != mh.scale:
                return False
            if f"{emb[:-len('.weight')]}.bias" in self.updates or f"{head[:-len('.weight')]}.bias" in self.updates:
                return False

            def oriented(m):  # (left, right) factors with ΔW = s·left·right in the (vocab, hidden) layout
                return (m.A.T, m.B.T) if m.kind == "embedding" else (m.B, m.A)
            (le, re_), (lh, rh) = oriented(me), oriented(mh)
            if le.shape != lh.shape or re_.shape != rh.shape or not (torch.equal(le.float(), lh.float()) and
                                                                     torch.equal(re_.float(), rh.float())):
                return False
        return True

    # -- experts ---------------------------------------------------------------------------------
    def _plan_experts(self) -> None:
        """Output names of the expert tensors, as transformers writes them: per-expert 2-D tensors
        for per-expert families (whether the base stores them so or in the fused in-memory layout),
        fused 3-D stacks for gpt-oss (MXFP4 stacks become bf16 ``gate_up_proj`` / ``down_proj``)."""
        ex = self.experts
        self.expert_out: dict[str, tuple] = {}   # output name -> ("weight", canonical) | ("stack", slab tensor)
        self._expert_info: dict[str, st.TensorInfo] = {}
        self._expansion: dict[str, list[str]] = {}  # stored tensor -> the output names it becomes
        self.dequantized = sorted({L for L, kind in ex.layout.items() if kind == "mxfp4"})
        for k in self.ck.keys():
            if not ex.covers(k):
                continue
            logical = ex.stored[k]
            slabs = [(logical, e) for e in ex.slabs_of(logical)]
            kind = ex.weights[ex.in_slab(*slabs[0])[0]].slot
            if slabs[0][1] is None or ex.layout[ex.weights[ex.in_slab(*slabs[0])[0]].layer] == "fused":
                outs = [c for t, e in slabs for c in ex.in_slab(t, e)]
                dt = self.ck.info(k).dtype
                for c in outs:
                    self.expert_out[c] = ("weight", c)
                    self._expert_info[c] = st.TensorInfo(c, dt, ex.weights[c].shape)
                self._expansion[k] = outs
            elif kind.stored == "mxfp4":
                if not k.endswith("_blocks"):
                    self._expansion[k] = []
                    continue
                i = self.ck.info(k)
                self.expert_out[logical] = ("stack", logical)
                self._expert_info[logical] = st.TensorInfo(logical, torch.bfloat16,
                                                           (i.shape[0], i.shape[2] * i.shape[3] * 2, i.shape[1]))
                self._expansion[k] = [logical]
            else:
                self.expert_out[k] = ("stack", k)
                self._expert_info[k] = self.ck.info(k)
                self._expansion[k] = [k]

    def _expert_changed(self, name: str) -> bool:
        kind, x = self.expert_out[name]
        if kind == "weight":
            return x in self.updates
        return any(c in self.updates for e in self.experts.slabs_of(x) for c in self.experts.in_slab(x, e))

    def _apply(self, W: torch.Tensor, name: str) -> None:
        """``W += Σ updates`` of one canonical expert weight (fp32, in place)."""
        for m, w in self.updates.get(name, ()):
            W.addmm_(m.B.to(self.dev, torch.float32), m.A.to(self.dev, torch.float32), alpha=m.scale * w)

    def expert_weight(self, cname: str) -> torch.Tensor:
        """One canonical expert weight (``...experts.E.gate_proj.weight``), merged, (out, in), fp32."""
        W = self.experts.read(self.ck, cname).to(self.dev)
        check_finite(W, self.experts.weights[cname].slot.tensor, self.ck.path)
        self._apply(W, cname)
        return W.cpu()

    def slabs(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(expert, merged slab) of a fused output stack, one expert at a time (fp32 when changed or
        dequantized, else as stored)."""
        changed = self._expert_changed(name) or self.experts.weights[self.experts.in_slab(name, 0)[0]].slot.stored == "mxfp4"
        touched = False
        for e in self.experts.slabs_of(name):
            t = name
            slab = self.experts.read_slab(self.ck, t, e, torch.float32 if changed else None)
            check_finite(slab, t, self.ck.path)
            if changed:
                slab = slab.to(self.dev)
                for c in self.experts.in_slab(t, e):
                    if c in self.updates:
                        d = torch.zeros(self.experts.weights[c].shape, dtype=torch.float32, device=self.dev)
                        self._apply(d, c)
                        self.experts.weights[c].slot.add_(slab, d)
                        touched = True
                slab = slab.cpu()
            yield e, slab
        if touched:
            self.modified.append(name)

    def expert_report(self) -> dict:
        """Changed experts: {"experts_changed": n, "experts_changed_by_layer": {layer: n}}."""
        by: dict[int, set] = {}
        for c in self.updates:
            w = self.experts.weights.get(c)
            if w is not None:
                by.setdefault(w.layer, set()).add(w.expert)
        return {"experts_changed": sum(len(v) for v in by.values()),
                "experts_changed_by_layer": {str(L): len(v) for L, v in sorted(by.items())}}

    def _bias_switches(self, adapters: Sequence[Adapter], shapes: dict) -> tuple[dict, dict]:
        """A lora_bias on a layer without a bias: turn on the family's switch for it (config field
        -> True) and add a zero bias to every module the switch governs; refuse without a switch."""
        need = sorted({n for a in adapters for n, m in a.modules.items()
                       if m.bias is not None and f"{n}.bias" not in shapes and f"{n}.weight" in shapes})
        if not need:
            return {}, {}
        mt = self.model_info.model_type
        switches: dict[str, tuple] = {}
        for n in need:
            key = bias_switch(mt, n.rpartition(".")[2])
            if key is None:
                src = next(a.source for a in adapters if n in a.modules) or None
                raise IncompatibleError(f"module {n!r}: its lora_B.bias (lora_bias) cannot be merged: the base model "
                                        f"{self.ck.path} has no bias on that layer and model_type {mt!r} has no config switch "
                                        "that adds one (PEFT cannot merge it either)", src)
            switches[key] = bias_switches(mt)[key]
        added: dict[str, st.TensorInfo] = {}
        for k in self.ck.keys():
            mod, _, leaf = k.rpartition(".")
            i = self.ck.info(k)
            if leaf == "weight" and len(i.shape) == 2 and f"{mod}.bias" not in shapes and \
                    any(mod.rpartition(".")[2] in leaves for leaves in switches.values()):
                added[f"{mod}.bias"] = st.TensorInfo(f"{mod}.bias", i.dtype, (i.shape[0],))
        return added, {key: True for key in switches}

    @property
    def cfg(self):
        """The base's full ModelConfig (for the exporters; refuses families loratools cannot run)."""
        if self._cfg is None:
            from ..models.config import load_config

            self._cfg = load_config(self.ck.root)
        return self._cfg

    @property
    def merged_cfg(self):
        """The ModelConfig of the merged model (config() parsed: a lora_bias merge turns bias switches
        on, an untie turns tie_word_embeddings off); exporters that write the merged tensors check
        them against this one."""
        from ..models.config import parse_config

        return parse_config(self.config(), self.ck.root / "config.json")

    def names(self) -> list[str]:
        keys = [x for k in self.ck.keys() for x in self._expansion.get(k, [k])]
        out = keys + ([self.tied[1]] if self.untie and self.tied[1] not in self.ck else [])
        if self.added:  # each added bias right after its weight
            out = [x for n in out for x in ([n, n[:-len("weight")] + "bias"] if n[:-len("weight")] + "bias" in self.added else [n])]
        return out

    def source(self, name: str) -> str:
        return head_source(name, self.tied)  # what a tied head really computes with

    def info(self, name: str) -> st.TensorInfo:
        if name in self._expert_info:
            return self._expert_info[name]
        if name in self.added:
            return self.added[name]
        i = self.ck.info(self.source(name))
        return st.TensorInfo(name, i.dtype, i.shape)

    def changed(self, name: str) -> bool:
        if name in self.expert_out:
            return self._expert_changed(name)
        return name in self.saved or name in self.updates or name in self.added

    def stored_as_is(self, name: str) -> bool:
        """Whether output tensor ``name`` is a base tensor of the same name, dtype and shape (its
        bytes can be copied when unchanged)."""
        src = self.source(name)
        return src in self.ck and (name not in self._expert_info or
                                   tuple(self.ck.info(src).shape) == tuple(self._expert_info[name].shape) and
                                   self.ck.info(src).dtype == self._expert_info[name].dtype)

    def tensor(self, name: str, mapped: bool = False) -> torch.Tensor:
        """The merged tensor: an unchanged one as stored (``mapped``: a file-backed map where the shard
        is safetensors, no private copy), a changed one in float32."""
        if name in self.expert_out:
            kind, x = self.expert_out[name]
            if kind == "stack":  # the whole 3-D stack (exporters of small models; merge writes slabs())
                return torch.stack([s for _, s in self.slabs(name)])
            if x not in self.updates:
                t = self.experts.read(self.ck, x, dtype=None)
                check_finite(t, self.experts.weights[x].slot.tensor, self.ck.path)
                return t
            self.modified.append(name)
            return self.expert_weight(x)
        src = self.source(name)
        # a full tensor saved with the adapter (modules_to_save, save_embedding_layers) replaces the
        # base tensor; LoRA updates on the same module then apply on top of it, as in PEFT
        if name in self.added:
            t = torch.zeros(self.added[name].shape, dtype=self.added[name].dtype)
        else:
            # (a map only when nothing is added in place below: writes to it would show in later reads)
            t = self.saved[name] if name in self.saved else \
                self.ck.get_mapped(src) if mapped and name not in self.updates else self.ck.get(src)
        if name not in self.saved and name not in self.added:
            self.check_input(name, t)  # every base tensor read, changed or not (one aminmax pass)
        ups = self.updates.get(name, [])
        if not ups:
            if name in self.saved:
                self.modified.append(name)
            return t
        W = t.to(self.dev, torch.float32)
        for m, w in ups:
            if name.endswith(".bias"):
                W += (m.scale * w) * m.bias.to(self.dev, torch.float32)
                continue
            B, A = m.B.to(self.dev, torch.float32), m.A.to(self.dev, torch.float32)
            if m.kind == "embedding":  # ΔE = s·(B A)ᵀ = s·Aᵀ Bᵀ
                W.addmm_(A.T, B.T, alpha=m.scale * w)
            else:  # in place: no dense ΔW beside W
                W.addmm_(B, A, alpha=m.scale * w)
            if m.magnitude is not None:
                W *= (m.magnitude.to(self.dev, torch.float32) / torch.linalg.norm(W, dim=1))[:, None]
        self.modified.append(name)
        return W.cpu()

    def shard_of(self, name: str):
        """The file that stores the base tensor of output ``name`` (for messages)."""
        return self.ck.index.get(self.source(name), self.ck.path)

    def check_input(self, name: str, t: torch.Tensor) -> None:
        """Refuse a base tensor holding NaN/Inf (exit 2, the shard file, the tensor and the count named)."""
        check_finite(t, self.source(name), self.shard_of(name))

    def plain(self, name: str) -> bool:
        """Whether ``name`` is a stored 2-D weight changed by plain LoRA updates only (no DoRA
        magnitude, bias, saved or added tensor, expert): ``merge_rows`` computes it a block of rows
        at a time, into a caller's buffer."""
        src = self.source(name)
        return (name in self.updates and name.endswith(".weight") and name not in self.saved and
                name not in self.added and name not in self.expert_out and src in self.ck and
                len(self.ck.info(src).shape) == 2 and self.dev.type == "cpu" and
                self.ck.safetensors_file(src) is not None and
                all(m.magnitude is None and m.kind in ("linear", "embedding") for m, _ in self.updates[name]))

    def merge_rows(self, name: str, W: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the merged tensor ``name`` (a ``plain`` one) computed into the float32
        buffer ``W`` (shape (r1 - r0, columns)): the base rows converted, then each update's rows
        added in place, in the order and with the arithmetic of ``tensor()`` (all rows at once are
        exactly its computation)."""
        W.copy_(self.ck.get_mapped(self.source(name))[r0:r1])
        for m, w in self.updates[name]:
            B, A = m.B.to(self.dev, torch.float32), m.A.to(self.dev, torch.float32)
            if m.kind == "embedding":  # ΔE = s·(B A)ᵀ = s·Aᵀ Bᵀ
                W.addmm_(A.T[r0:r1], B.T, alpha=m.scale * w)
            else:
                W.addmm_(B[r0:r1], A, alpha=m.scale * w)
        return W

    def config(self, dtype: torch.dtype | None = None) -> dict:
        config = dict(self.model_info.raw)
        if dtype is not None:
            config["dtype"] = CONFIG_DTYPE[dtype]
            if "torch_dtype" in config:
                config["torch_dtype"] = CONFIG_DTYPE[dtype]
        if self.untie:
            config["tie_word_embeddings"] = False
            if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
                config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
        config.update(self.switches)
        if self.dequantized:  # MXFP4 experts are written dequantized (bf16): the model is no longer quantized
            config.pop("quantization_config", None)
        return config


STREAMED = True  # the buffered, row-blocked writer below; tests set False to compare it with _write_plain
BLOCK_ELEMS = 1 << 25  # a merged tensor above this many elements (128 MiB in fp32) is computed a block of rows at a time
MIN_BLOCK_ROWS = 256   # (never fewer rows: the GEMM of a block then sums exactly as the whole tensor's)


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of a merged (rows, cols) tensor: the whole tensor when it has at most
    BLOCK_ELEMS elements, else blocks of about BLOCK_ELEMS elements, never fewer than MIN_BLOCK_ROWS
    rows (a short tail joins the block before it)."""
    if rows * cols <= BLOCK_ELEMS:
        return [(0, rows)]
    step = max(MIN_BLOCK_ROWS, BLOCK_ELEMS // max(1, cols))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < MIN_BLOCK_ROWS:
        starts.pop()
    return [(r0, starts[j + 1] if j + 1 < len(starts) else rows) for j, r0 in enumerate(starts)]


def _rounded(view: MergedView, name: str, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out.copy_(t)`` (rounding once to the output type), refusing a non-finite result (exit 3):
    the inputs are finite (checked), so the merged values lie outside the output type's range."""
    if out is not t:
        out.copy_(t)
    if out.dtype == torch.float16:
        hint = "write bf16 or fp32 instead (--dtype bf16)"
    else:
        hint = "the adapter's update is too large for any floating-point type"
    check_output_finite(out, name, str(out.dtype).replace("torch.", ""), hint)
    return out


def _write_plain(view: MergedView, wr: CheckpointWriter, specs: list, bar) -> None:
    """One tensor after the other, each computed whole (``view.tensor``): the reference the streamed
    writer must match byte for byte (and the path of expert stacks). ``bar``: ``specs`` in a progress bar."""
    ck = view.ck
    for spec in bar:
        if not view.changed(spec.name) and view.stored_as_is(spec.name):
            view.check_input(spec.name, ck.get_mapped(view.source(spec.name)))
            if wr.copy_from(spec.name, ck, view.source(spec.name)):
                continue  # unchanged: bytes copied file to file, never loaded
        if view.expert_out.get(spec.name, ("",))[0] == "stack":
            for e, slab in view.slabs(spec.name):  # a fused expert stack: one expert at a time
                wr.write_part(spec.name, e, _rounded(view, spec.name, slab, torch.empty(slab.shape, dtype=spec.dtype)))
            continue
        t = view.tensor(spec.name)  # (it refuses a non-finite base tensor)
        wr.write(spec.name, _rounded(view, spec.name, t, torch.empty(t.shape, dtype=spec.dtype)))


class _Buffers:
    """Reused work buffers (a fresh allocation of a large tensor costs a page fault per 4 KiB, more
    than the arithmetic): the float32 work buffer and one output buffer per dtype, grown to the largest use."""

    def __init__(self):
        self._b: dict[tuple, torch.Tensor] = {}

    def get(self, shape, dtype: torch.dtype, slot: str = "out") -> torch.Tensor:
        n, key = math.prod(shape), (slot, dtype)
        b = self._b.get(key)
        if b is None or b.numel() < n:
            self._b.pop(key, None)
            b = self._b[key] = torch.empty(n, dtype=dtype)
        return b[:n].view(shape)


def _write_streamed(view: MergedView, wr: CheckpointWriter, specs: list, bar) -> None:
    """The same bytes as ``_write_plain``, at the speed of the copy: unchanged tensors are checked in
    place (one aminmax over the file-backed map) and copied file to file; a changed one is computed
    into reused buffers, a block of rows at a time when it is large (memory stays at a fixed block
    budget, whatever the vocabulary), its finiteness taken from the rounded result; the next
    tensor's bytes are read ahead by the kernel; the shards reach the disk while they are written
    (CheckpointWriter's background sync)."""
    ck, buf = view.ck, _Buffers()
    for i, spec in enumerate(bar):
        name = spec.name
        if i + 1 < len(specs):
            nxt = view.source(specs[i + 1].name)
            if nxt in ck and ck.safetensors_file(nxt) is not None:
                ck.safetensors_file(nxt).will_need(nxt)
        if not view.changed(name) and view.stored_as_is(name):
            t = ck.get_mapped(view.source(name))
            view.check_input(name, t)
            if wr.copy_from(name, ck, view.source(name)):
                continue
            wr.write(name, _rounded(view, name, t, buf.get(t.shape, spec.dtype)))
            continue
        if not view.plain(name):
            t = view.tensor(name)
            wr.write(name, _rounded(view, name, t, buf.get(t.shape, spec.dtype)))
            continue
        view.check_input(name, ck.get_mapped(view.source(name)))
        rows, cols = spec.shape
        blocks = row_blocks(rows, cols)
        for r0, r1 in blocks:
            W = view.merge_rows(name, buf.get((r1 - r0, cols), torch.float32, "work"), r0, r1)
            out = _rounded(view, name, W, W if spec.dtype == torch.float32 else buf.get((r1 - r0, cols), spec.dtype))
            wr.write(name, out) if len(blocks) == 1 else wr.write_rows(name, r0, out)
        view.modified.append(name)


def merge(base: str | os.PathLike, adapters: Sequence[Adapter], out: str | os.PathLike,
          weights: Sequence[float] | None = None, dtype: torch.dtype | None = None,
          max_shard_size: int | str = DEFAULT_MAX_SHARD, device: str = "auto", overwrite: bool = False,
          unmerge: bool = False, quiet: bool = True) -> dict:
    """Write base + adapters (or base − adapters with ``unmerge``) as a new checkpoint."""
    check_output(out, [base] + [a.source for a in adapters if a.source], overwrite)
    dev = pick_device(device)
    for a in adapters:
        if unmerge and a.use_dora:
            raise UnsupportedError("a DoRA merge cannot be undone exactly (the row norms of the original weight are lost)", a.source or None)
        if unmerge and a.modules_to_save:
            raise UnsupportedError("modules_to_save replaced whole tensors; the originals cannot be recovered by unmerge", a.source or None)
    read_model_info(base)
    with Checkpoint.open(base) as ck:
        view = MergedView(ck, adapters, weights, -1.0 if unmerge else 1.0, dev)
        specs = []
        for n in view.names():
            i = view.info(n)
            specs.append(st.TensorInfo(n, dtype if dtype is not None and i.dtype.is_floating_point else i.dtype, i.shape))
        check_space(out, sum(s.nbytes for s in specs), "the merged checkpoint")
        with CheckpointWriter(out, specs, max_shard_size=max_shard_size, aux_from=ck.root, config=view.config(dtype)) as wr:
            write = _write_streamed if STREAMED and not view.experts else _write_plain
            order = wr.file_order(specs)  # each shard written front to back
            write(view, wr, order, progress(order, "unmerge" if unmerge else "merge", quiet=quiet))
        rank = {s.name: i for i, s in enumerate(specs)}
        view.modified.sort(key=lambda n: rank.get(n, len(rank)))  # reported in the checkpoint's order
    report = {"base": str(base), "out": str(out), "adapters": [a.source for a in adapters],
              "weights": list(weights) if weights is not None else [1.0] * len(adapters), "unmerge": unmerge,
              "device": str(dev), "modified": view.modified}
    if view.experts:
        report["tensors_changed"] = len(view.modified)
        report.update(view.expert_report())
        if view.dequantized:
            report["dequantized"] = {"from": "mxfp4", "to": CONFIG_DTYPE[dtype or torch.bfloat16],
                                     "layers": view.dequantized, "quantization_config": "dropped from config.json"}
    if view.tied is not None and any(k in view.updates or k in view.saved for k in view.tied):
        report["tied_embeddings"] = "untied" if view.untie else "kept"
    if view.untie:
        report["untied_embeddings"] = True
    if view.switches:
        report["biases_added"] = {"config": view.switches, "zero_biases": sorted(set(view.added) - set(view.modified))}
    return report
