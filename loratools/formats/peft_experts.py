"""Expert LoRA in PEFT adapters: the fused ``target_parameters`` form <-> loratools' canonical
per-expert modules.

transformers 5 holds the routed experts of an MoE block as two 3-D parameters of one module
``model.layers.L.mlp.experts`` (``gate_up_proj``, ``down_proj``). PEFT adapts them with
``LoraConfig(target_parameters=[...])``: one ``ParamWrapper`` per parameter, nested when two
parameters of the same module are targeted — the parameter the experts class defines first
(``gate_up_proj``) is wrapped first and ends up innermost. Saved keys (PEFT 0.21, measured):

    both targeted     <X>.base_layer.lora_A.weight / lora_B.weight   gate_up_proj  (inner)
                      <X>.lora_A.weight / lora_B.weight              down_proj     (outer)
    one targeted      <X>.lora_A.weight / lora_B.weight

with X = ``base_model.model.model.layers.L.mlp.experts``. For a parameter of E experts and rank r
(r, alpha from r / rank_pattern / alpha_pattern matched against the *parameter* name
``model.layers.L.mlp.experts.gate_up_proj``):

    lora_A.weight  (E·r, in)   = A.reshape(E, r, in)         expert-major
    lora_B.weight  (out, r·E)  = B.reshape(out, r, E)        expert-minor
    ΔW_e (out, in) = scale · B[:, :, e] @ A[e]

``in``/``out`` are the expert matrix's input/output widths whatever the parameter's orientation
((E, out, in) in Mixtral/Qwen/OLMoE; (E, in, out) in gpt-oss, whose experts class is
``is_transposed``). For ``gate_up_proj`` out = 2I: rows [:I] are gate and [I:] up, except gpt-oss
where gate is out[0::2] and up out[1::2] (interleaved). A router (``mlp.gate`` / ``mlp.router``:
a custom module, not nn.Linear, in transformers 5) is targeted as the 2-D parameter
``mlp.gate.weight``: its keys are those of an ordinary module, ``<mlp.gate>.lora_A.weight``, and
its rank/alpha are matched against ``...mlp.gate.weight``.

Canonically (arch/spec.py MoeSpec) each expert matrix is an ordinary 2-D LoraModule named as the
per-expert disk tensor is (``model.layers.L.mlp.experts.e.gate_proj``; Mixtral
``model.layers.L.block_sparse_moe.experts.e.w1``); a fused gate_up LoRA becomes gate and up
modules that share one A. Writing back fuses them again: a common A per expert when gate and up
share it, else A = [A_gate; A_up] with a block-diagonal B (rank r_g + r_u, exact — as PEFT's own
v4 -> v5 conversion does); experts are padded to a common rank with zeros and per-expert scale
differences are folded into B.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from ..adapter import LoraModule, lora_scale, resolve_rank_alpha
from ..errors import InputError, UnsupportedError

MEM_BLOCK = "mlp"                    # transformers 5 names every MoE block "mlp" in memory (and PEFT does)
FUSED = ("gate_up_proj", "down_proj")  # the order the experts classes define them: PEFT nests the first innermost
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias")
EXPERT_FORMS = ("fused", "per_expert")

_FUSED_MOD_RE = re.compile(r"^(?P<x>.*\.layers\.\d+\.mlp\.experts)(?P<nest>(?:\.base_layer)*)$")
_CANON_RE = re.compile(r"^(?P<pre>.*\.layers\.\d+)\.(?P<block>[A-Za-z_]+)\.experts\.(?P<e>\d+)\.(?P<leaf>[A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class ExpertLayout:
    """How one family names and lays out its experts (from its MoeSpec)."""
    family: str | None
    block: str = "mlp"                                   # canonical (disk) block name
    leaves: tuple = ("gate_proj", "up_proj", "down_proj")
    router: str = "gate"
    interleaved: bool = False                            # gpt-oss: gate = out[0::2], up = out[1::2]
    per_expert_modules: bool = True                      # transformers 4.x had per-expert nn.Linear modules
    params_in_out: bool = False                          # fused parameters are (E, in, out) (gpt-oss: is_transposed)

    def gate_up_rows(self, out: int) -> tuple:
        half = out // 2
        return (slice(0, None, 2), slice(1, None, 2)) if self.interleaved else (slice(0, half), slice(half, out))


DEFAULT_LAYOUT = ExpertLayout(None)

# Families whose per-expert (transformers 4.x) adapters PEFT converts to the fused form when it loads
# them into a transformers 5 model. Measured with PEFT 0.21.2 + transformers 5.24: the conversion
# (peft/utils/transformers_weight_conversion.py, _convert_peft_config_moe) looks the model_type up in
# transformers' _MODEL_TO_CONVERSION_PATTERN, which maps qwen3_moe and olmoe to the "qwen2_moe" rules
# and PEFT adds "mixtral" itself, but has no "qwen2_moe" key: a per-expert Qwen2-MoE adapter is not
# converted (PeftModel then fails on the router, a custom module).
PEFT_CONVERTS_PER_EXPERT = ("mixtral", "qwen3_moe", "olmoe")


def layout_for(family: str | None) -> ExpertLayout | None:
    """The expert layout of registry family ``family``; None when it is not an MoE family."""
    from ..arch.registry import FAMILIES

    spec = FAMILIES.get(family or "")
    if spec is None or spec.moe is None:
        return None
    moe = spec.moe
    gpt = moe.disk_layout == "gpt_oss"
    return ExpertLayout(family, moe.block, tuple(moe.leaves), moe.router, interleaved=gpt, per_expert_modules=not gpt,
                        params_in_out=gpt)


# PEFT before 0.19.1 read every 3-D parameter positionally as (E, in, out); for the (E, out, in) parameters
# of Mixtral / Qwen / OLMoE that swaps the roles of A and B (lora_A (E·r, out), lora_B (in, r·E), and
# ΔW_e = (B_e A_e)ᵀ). 0.19.1 honours the experts class's is_transposed flag (the layout in the module
# docstring); gpt-oss's (E, in, out) parameters read the same in both. Sources: PEFT 0.21.2's ParamWrapper
# (tuners/lora/layer.py, swap_in_out_features); NVIDIA-NeMo/Automodel#3626 ("corrected peft >= 0.19.1
# layout"); vllm-project/vllm#52194.
PEFT_SWAPPED_BEFORE = (0, 19, 1)


def peft_version(cfg: dict) -> tuple | None:
    v = cfg.get("peft_version")
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", v) if isinstance(v, str) else None
    return tuple(int(x or 0) for x in m.groups()) if m else None


def targets_param(name: str, target_parameters) -> bool:
    """PEFT's match of a parameter name against target_parameters (exact or a dotted suffix)."""
    return any(name == t or name.endswith("." + t) for t in target_parameters or ())


def is_expert_name(name: str) -> bool:
    return _CANON_RE.match(name) is not None


def canonical_router(name: str, layout: ExpertLayout) -> str:
    """A router's in-memory name (``...mlp.gate``) as its canonical (disk) name."""
    if layout.block != MEM_BLOCK:
        return re.sub(rf"\.{MEM_BLOCK}\.({re.escape(layout.router)})$", rf".{layout.block}.\1", name)
    return name


def memory_router(name: str, layout: ExpertLayout) -> str:
    if layout.block != MEM_BLOCK:
        return re.sub(rf"\.{re.escape(layout.block)}\.({re.escape(layout.router)})$", rf".{MEM_BLOCK}.\1", name)
    return name


def is_router(name: str, layout: ExpertLayout) -> bool:
    return re.search(rf"\.layers\.\d+\.({MEM_BLOCK}|{re.escape(layout.block)})\.{re.escape(layout.router)}$", name) is not None


# -- reading -------------------------------------------------------------------------------------
def fused_modules(parts: dict[str, dict], cfg: dict, layout: ExpertLayout | None, wpath) -> dict[str, LoraModule]:
    """Pop the fused expert LoRA (``...mlp.experts[.base_layer]``) out of ``parts`` (module ->
    {"A", "B"}) and return it as canonical per-expert modules."""
    tp = cfg.get("target_parameters") or []
    found = [m for m in parts if _FUSED_MOD_RE.match(m)]
    if not found:
        return {}
    if layout is None:
        raise UnsupportedError("the adapter holds fused expert LoRA (target_parameters on mlp.experts) but its base "
                               "family is unknown, so the expert layout (gpt-oss interleaves gate/up columns) cannot "
                               "be told; pass the base model (--base)", wpath)
    rslora = bool(cfg.get("use_rslora"))
    out: dict[str, LoraModule] = {}
    for mod in sorted(found):
        p = parts.pop(mod)
        mt = _FUSED_MOD_RE.match(mod)
        x, depth = mt.group("x"), mt.group("nest").count(".base_layer")
        for b in EXPERT_BIASES:
            if targets_param(f"{x}.{b}", tp):
                raise UnsupportedError(f"target_parameters targets the expert bias {x}.{b}: LoRA on a bias vector "
                                       "is not supported", wpath)
        targeted = [f for f in FUSED if targets_param(f"{x}.{f}", tp)]
        if depth >= len(targeted):
            raise InputError(f"tensors of {mod!r} match no parameter in target_parameters {tp!r} "
                             f"(targeted on {x}: {targeted or 'none'})", wpath)
        param = targeted[len(targeted) - 1 - depth]  # the first-defined parameter is the innermost wrapper
        if "A" not in p or "B" not in p:
            raise InputError(f"module {mod!r} has lora_{'A' if 'A' in p else 'B'} but not both", wpath)
        if set(p) - {"A", "B"}:
            raise UnsupportedError(f"module {mod!r}: {sorted(set(p) - {'A', 'B'})} on expert parameters is not supported", wpath)
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise InputError(f"module {mod!r}: lora_A / lora_B must be 2-D, got {tuple(A.shape)} and {tuple(B.shape)}", wpath)
        r, alpha = resolve_rank_alpha(cfg, f"{x}.{param}")
        E = A.shape[0] // r
        if E < 1 or A.shape[0] != E * r or B.shape[1] != E * r:
            raise InputError(f"{x}.{param}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}, which is not "
                             f"(experts·{r}, in) and (out, {r}·experts) for rank {r} (r / rank_pattern)", wpath)
        scale = lora_scale(alpha, r, rslora)
        A3 = A.reshape(E, r, A.shape[1])
        B3 = B.reshape(B.shape[0], r, E).permute(2, 0, 1)  # (E, out, r)
        ver = peft_version(cfg)
        if not layout.params_in_out and ver is not None and ver < PEFT_SWAPPED_BEFORE:
            A3, B3 = B3.transpose(1, 2), A3.transpose(1, 2)  # an older PEFT's positional (E, in, out) reading
        canon = x[: -len(f".{MEM_BLOCK}.experts")] + f".{layout.block}.experts"
        gate, up, down = layout.leaves
        if param == "gate_up_proj":
            n_out = B3.shape[1]
            if n_out % 2:
                raise InputError(f"{x}.gate_up_proj: its LoRA has {n_out} output rows, not 2·intermediate", wpath)
            g_rows, u_rows = layout.gate_up_rows(n_out)
            for e in range(E):
                a = A3[e].clone()  # one tensor shared by gate and up: the fused A
                a = a.contiguous()
                out[f"{canon}.{e}.{gate}"] = LoraModule(A=a, B=B3[e][g_rows].contiguous(), scale=scale, alpha=alpha)
                out[f"{canon}.{e}.{up}"] = LoraModule(A=a, B=B3[e][u_rows].contiguous(), scale=scale, alpha=alpha)
        else:
            for e in range(E):
                out[f"{canon}.{e}.{down}"] = LoraModule(A=A3[e].contiguous().clone(), B=B3[e].contiguous(), scale=scale,
                                                        alpha=alpha)
    return out


# -- writing -------------------------------------------------------------------------------------
@dataclass
class FusedParam:
    """One fused expert parameter's LoRA: A (E·r, in), B (out, r·E), PEFT's layout."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    experts: int

    @property
    def rank(self) -> int:
        return self.A.shape[0] // self.experts


def _common_scale(mods: list[LoraModule]) -> float:
    return Counter(m.scale for m in mods).most_common(1)[0][0]


def _scaled_B(m: LoraModule, s: float) -> torch.Tensor:
    """m.B with m.scale / s folded in (untouched when the ratio is 1: round trips stay exact)."""
    if m.scale == s:
        return m.B
    return (m.B.float() * (m.scale / s)).to(m.B.dtype)


def _pad(A: torch.Tensor, B: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = A.shape[0]
    if r == R:
        return A, B
    return torch.cat([A, A.new_zeros(R - r, A.shape[1])], 0), torch.cat([B, B.new_zeros(B.shape[0], R - r)], 1)


def _expert_gate_up(g: LoraModule | None, u: LoraModule | None, s: float, layout: ExpertLayout, name: str):
    """(A_e (r, in), B_e (2I, r)) of one expert's fused gate_up LoRA at common scale s."""
    ref = g or u
    I, n_in = ref.out_features, ref.in_features
    for m in (g, u):
        if m is not None and (m.out_features != I or m.in_features != n_in):
            raise InputError(f"{name}: gate and up LoRA have different shapes ({g.weight_shape} vs {u.weight_shape})")
    g_rows, u_rows = layout.gate_up_rows(2 * I)
    if g is not None and u is not None and g.rank == u.rank and torch.equal(g.A, u.A):
        A = g.A
        B = A.new_zeros(2 * I, g.rank)
        B[g_rows], B[u_rows] = _scaled_B(g, s), _scaled_B(u, s)
        return A, B
    parts = [(m, rows) for m, rows in ((g, g_rows), (u, u_rows)) if m is not None]
    A = torch.cat([m.A for m, _ in parts], 0)
    B = A.new_zeros(2 * I, A.shape[0])
    c = 0
    for m, rows in parts:  # block-diagonal: gate's columns feed gate rows only, up's the up rows
        B[rows, c:c + m.rank] = _scaled_B(m, s)
        c += m.rank
    return A, B


def fuse_experts(modules: dict[str, LoraModule], layout: ExpertLayout, num_experts: int | None = None,
                 ) -> tuple[dict[str, LoraModule], dict[str, FusedParam]]:
    """Split ``modules`` into (the non-expert modules, {in-memory parameter name
    (``model.layers.L.mlp.experts.gate_up_proj``): its fused LoRA})."""
    rest: dict[str, LoraModule] = {}
    groups: dict[str, dict[int, dict[str, LoraModule]]] = {}
    gate, up, down = layout.leaves
    for name, m in modules.items():
        mt = _CANON_RE.match(name)
        if mt is None or mt.group("block") not in (layout.block, MEM_BLOCK) or mt.group("leaf") not in layout.leaves:
            rest[name] = m
            continue
        if m.kind != "linear" or m.bias is not None or m.magnitude is not None:
            raise UnsupportedError(f"{name}: PEFT's target_parameters LoRA on experts has no "
                                   f"{'embedding' if m.kind != 'linear' else 'lora_bias' if m.bias is not None else 'DoRA'} form")
        groups.setdefault(mt.group("pre"), {}).setdefault(int(mt.group("e")), {})[mt.group("leaf")] = m
    fused: dict[str, FusedParam] = {}
    for pre, experts in sorted(groups.items()):
        E = max(experts) + 1
        if num_experts is not None:
            if E > num_experts:
                raise InputError(f"{pre}: expert {E - 1} has LoRA but the model has {num_experts} experts")
            E = num_experts
        x = f"{pre}.{MEM_BLOCK}.experts"
        for param, leaves in (("gate_up_proj", (gate, up)), ("down_proj", (down,))):
            mods = [m for ex in experts.values() for lf in leaves if (m := ex.get(lf)) is not None]
            if not mods:
                continue
            s = _common_scale(mods)
            per = {}
            for e, ex in experts.items():
                if param == "gate_up_proj":
                    if ex.get(gate) is None and ex.get(up) is None:
                        continue
                    per[e] = _expert_gate_up(ex.get(gate), ex.get(up), s, layout, f"{pre} expert {e}")
                elif ex.get(down) is not None:
                    per[e] = (ex[down].A, _scaled_B(ex[down], s))
            R = max(a.shape[0] for a, _ in per.values())
            a0, b0 = next(iter(per.values()))
            As, Bs = [], []
            for e in range(E):
                a, b = per.get(e, (a0.new_zeros(0, a0.shape[1]), b0.new_zeros(b0.shape[0], 0)))
                a, b = _pad(a, b, R)
                As.append(a)
                Bs.append(b)
            A = torch.stack(As).reshape(E * R, a0.shape[1])                  # (E, R, in) expert-major
            B = torch.stack(Bs).permute(1, 2, 0).reshape(b0.shape[0], R * E)  # (out, R, E) expert-minor
            fused[f"{x}.{param}"] = FusedParam(A=A.contiguous(), B=B.contiguous(), scale=s, experts=E)
    return rest, fused


def fused_keys(fused: dict[str, FusedParam], prefix: str) -> dict[str, torch.Tensor]:
    """PEFT's saved keys of the fused parameters (the nesting rule in the module docstring)."""
    sd: dict[str, torch.Tensor] = {}
    by_module: dict[str, list[str]] = {}
    for pname in fused:
        x, _, param = pname.rpartition(".")
        by_module.setdefault(x, []).append(param)
    # target_parameters names each parameter for every layer (suffix form), so PEFT wraps every targeted
    # parameter of every experts module, in definition order: the nesting follows that global set, also in a
    # layer where one of them has no LoRA
    targeted = [f for f in FUSED if any(f in params for params in by_module.values())]
    for x, params in by_module.items():
        for param in (f for f in FUSED if f in params):
            nest = ".base_layer" * (len(targeted) - 1 - targeted.index(param))
            fp = fused[f"{x}.{param}"]
            sd[f"{prefix}{x}{nest}.lora_A.weight"] = fp.A
            sd[f"{prefix}{x}{nest}.lora_B.weight"] = fp.B
    return sd


def pad_per_expert(modules: dict[str, LoraModule], layout: ExpertLayout) -> dict[str, LoraModule]:
    """For the per-expert (transformers 4.x) form: every expert and router module at one common rank
    and scale (PEFT's v4 -> v5 conversion gives the fused gate_up rank 2·r and alpha 2·lora_alpha
    from the config's global r / lora_alpha, and matches the router's rank against
    ``...gate.weight``; both only come out right when these modules use the global r and alpha)."""
    sel = [n for n in modules if is_expert_name(n) or is_router(n, layout)]
    if not sel:
        return modules
    R = max(modules[n].rank for n in sel)
    s = _common_scale([modules[n] for n in sel])
    out = dict(modules)
    for n in sel:
        m = modules[n]
        if m.bias is not None or m.magnitude is not None or m.kind != "linear":
            raise UnsupportedError(f"{n}: lora_bias / DoRA / embedding LoRA on experts or routers cannot be written "
                                   "in a form PEFT converts to transformers 5")
        A, B = _pad(m.A, _scaled_B(m, s), R)
        out[n] = LoraModule(A=A, B=B, scale=s, alpha=None)
    return out


def gate_up_pairs(modules: dict[str, LoraModule], family: str | None = None) -> list[tuple[str, str]]:
    """(gate, up) module names of each expert whose LoRA shares one A (as a fused gate_up LoRA
    does): operations keep them together so that the pair stays one fused LoRA."""
    layout = layout_for(family)
    if layout is None:
        layout = layout_for("mixtral") if any(".block_sparse_moe.experts." in n for n in modules) else DEFAULT_LAYOUT
    gate, up, _ = layout.leaves
    out = []
    for name, m in modules.items():
        mt = _CANON_RE.match(name)
        if mt is None or mt.group("leaf") != gate:
            continue
        other = name[: -len(gate)] + up
        u = modules.get(other)
        if u is not None and u.kind == m.kind == "linear" and u.rank == m.rank and torch.equal(u.A, m.A):
            out.append((name, other))
    return out


def expert_summary(modules: dict[str, LoraModule], family: str | None = None) -> dict:
    """Ranks per expert group: routed experts per layer and matrix (gate_up when gate and up share A,
    as one fused LoRA), the routers and the shared expert (Qwen2-MoE). Empty when there is no expert
    LoRA."""
    layout = layout_for(family)
    if layout is None:
        layout = layout_for("mixtral") if any(".block_sparse_moe." in n for n in modules) else DEFAULT_LAYOUT
    gate, up, down = layout.leaves
    shared_a = {g for g, _ in gate_up_pairs(modules, family)}
    routed: dict[str, dict] = {}
    routers, shared = {}, {}
    for name, m in modules.items():
        mt = _CANON_RE.match(name)
        if mt is not None and mt.group("leaf") in layout.leaves:
            blk = f"{mt.group('pre')}.{mt.group('block')}.experts"
            leaf = mt.group("leaf")
            if leaf in (gate, up) and name[: -len(leaf)] + gate in shared_a:
                if leaf == up:
                    continue
                leaf = "gate_up"
            g = routed.setdefault(blk, {}).setdefault(leaf, {"experts": 0, "ranks": set()})
            g["experts"] += 1
            g["ranks"].add(m.rank)
        elif is_router(name, layout):
            routers[name] = m.rank
        elif ".shared_expert" in name:
            shared[name] = m.rank
    order = ("gate_up", gate, up, down)
    for k, blk in routed.items():
        for g in blk.values():
            g["ranks"] = sorted(g["ranks"])
        routed[k] = {m: blk[m] for m in order if m in blk}
    if not routed and not routers and not shared:
        return {}
    return {"routed": {k: routed[k] for k in sorted(routed)}, "routers": dict(sorted(routers.items())),
            "shared_expert": dict(sorted(shared.items()))}
