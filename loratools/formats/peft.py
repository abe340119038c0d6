"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.<part>`` where part is ``lora_A.weight``,
``lora_B.weight``, ``lora_B.bias`` (lora_bias), ``lora_embedding_A`` / ``lora_embedding_B``
(embeddings), ``lora_magnitude_vector`` (DoRA); full tensors for modules_to_save are stored
as ``<module>.weight`` (or ``<module>.base_layer.weight`` for a LoRA-targeted embedding saved
with save_embedding_layers).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from .. import st
from ..adapter import Adapter, LoraModule, alpha_for_scale, lora_scale, resolve_rank_alpha
from ..checkpoint import read_json, torch_load_reason
from ..patterns import PatternRefused, compile_key
from ..errors import InputError, LoratoolsError, UnsupportedError
from ..fsutil import atomic_dir
from ..ops.common import check_finite
from . import peft_experts as px

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PARTS = {
    "lora_A.weight": ("linear", "A"), "lora_B.weight": ("linear", "B"), "lora_B.bias": ("linear", "bias"),
    "lora_embedding_A": ("embedding", "A"), "lora_embedding_B": ("embedding", "B"),
    "lora_magnitude_vector": (None, "magnitude"),
}
# init_lora_weights values for which PEFT rewrites the base weight at load time (W - s·B₀A₀)
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_PART_RE = re.compile(r"^(.*)\.(" + "|".join(re.escape(p) for p in PARTS) + r")$")


def is_peft_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def _check_config(cfg: dict, path: Path) -> None:
    def bad(field, want):
        raise InputError(f"field {field!r} must be {want}, got {cfg.get(field)!r}", path)

    pt = cfg.get("peft_type")
    if pt is None:
        raise InputError("missing field 'peft_type'", path)
    if not isinstance(pt, str) or pt.upper() != "LORA":
        raise UnsupportedError(f"peft_type {pt!r} is not supported (only LORA adapters)", path)
    if "r" not in cfg:
        raise InputError("missing field 'r'", path)
    if not isinstance(cfg["r"], int) or isinstance(cfg["r"], bool) or cfg["r"] <= 0:
        bad("r", "a positive integer")
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if "lora_alpha" in cfg and not number(cfg["lora_alpha"]):
        bad("lora_alpha", "a finite number")
    v = cfg.get("rank_pattern")
    if v is not None and (not isinstance(v, dict) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                             for x in v.values())):
        bad("rank_pattern", "an object mapping module patterns to positive integers")
    v = cfg.get("alpha_pattern")
    if v is not None and (not isinstance(v, dict) or not all(number(x) for x in v.values())):
        bad("alpha_pattern", "an object mapping module patterns to finite numbers")
    for pfield in ("rank_pattern", "alpha_pattern"):
        for key in cfg.get(pfield) or {}:
            try:
                compile_key(key)
            except PatternRefused as e:
                raise InputError(f"{pfield} key {key[:80]!r} is refused: {e}", path) from None
    for f in ("use_rslora", "use_dora"):
        if cfg.get(f) is not None and not isinstance(cfg[f], bool):
            bad(f, "true or false")
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, (str, list)):
        bad("target_modules", "a list of names or a regex string")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(x, str) for x in mts)):
        bad("modules_to_save", "a list of module names")
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedError("fan_in_fan_out=true (GPT-2 Conv1D layout) is not supported", path)
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise UnsupportedError(f"init_lora_weights={init!r}: PEFT subtracts the initial B·A from the base weights when it "
                               "loads this adapter, so it only fits that residual base; re-save it with PEFT's "
                               "path_initial_model_for_weight_conversion to get a plain LoRA", path)
    for f, why in (("alora_invocation_tokens", "an activated LoRA applies only after its invocation tokens"),
                   ("layer_replication", "layer_replication changes the model's layer stack")):
        if cfg.get(f):
            raise UnsupportedError(f"{f} is set: {why}", path)
    tp = cfg.get("target_parameters")
    if tp is not None and not (isinstance(tp, list) and all(isinstance(x, str) for x in tp)):
        bad("target_parameters", "a list of parameter names")


# model names as they appear in base_model_name_or_path -> registry family (only the expert layout is
# taken from it: gpt-oss interleaves gate/up, Mixtral names its experts w1/w3/w2)
_FAMILY_HINTS = (("gpt-oss", "gpt_oss"), ("gpt_oss", "gpt_oss"), ("mixtral", "mixtral"), ("olmoe", "olmoe"),
                 ("qwen2-moe", "qwen2_moe"), ("qwen2_moe", "qwen2_moe"), ("qwen1.5-moe", "qwen2_moe"),
                 ("qwen3-moe", "qwen3_moe"), ("qwen3_moe", "qwen3_moe"), ("-a3b", "qwen3_moe"), ("-a22b", "qwen3_moe"))


def adapter_family(cfg: dict, module_names=(), family: str | None = None) -> str | None:
    """The base family of an adapter: ``family`` when given, else the model_type of a local
    base_model_name_or_path, else a gpt-oss router among the modules, else a known name in
    base_model_name_or_path; None when none says."""
    if family:
        return family
    base = cfg.get("base_model_name_or_path")
    if isinstance(base, str) and base:
        p = Path(base) / "config.json"
        try:
            if p.is_file():
                mt = read_json(p, "config.json").get("model_type")
                if isinstance(mt, str):
                    return mt
        except (OSError, ValueError, InputError):
            pass
    if any(re.search(r"\.layers\.\d+\.mlp\.router$", n) for n in module_names):
        return "gpt_oss"
    if isinstance(base, str):
        low = base.lower()
        for hint, fam in _FAMILY_HINTS:
            if hint in low:
                return fam
    return None


def read_peft(path: str | os.PathLike, allow_pickle: bool = False, family: str | None = None) -> Adapter:
    """Read a PEFT adapter folder. ``family`` (the base's model_type) tells the expert layout of
    fused (target_parameters) expert LoRA; without it adapter_family() looks for one."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path)
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        path = path.parent
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise InputError(f"not a PEFT adapter: no {CONFIG}", path)
    cfg = read_json(cfg_path, CONFIG)
    _check_config(cfg, cfg_path)
    wpath = path / WEIGHTS
    if wpath.is_file():
        with st.SafetensorsFile(wpath) as f:
            sd = {k: f.get(k) for k in f.keys()}
    else:
        binp = path / "adapter_model.bin"
        if not binp.is_file():
            raise InputError(f"PEFT adapter has no {WEIGHTS}", path)
        if not allow_pickle:
            raise UnsupportedError("pickle adapter refused: unpickling can run arbitrary code; pass --allow-pickle "
                                   "to load it with torch.load(weights_only=True)", binp)
        try:
            sd = torch.load(binp, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot load with weights_only=True: {torch_load_reason(e)}", binp) from e
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise InputError("pickle file does not hold a flat dict of tensors", binp)
        wpath = binp
    return adapter_from_state_dict(sd, cfg, wpath, family)


def adapter_from_state_dict(sd: dict[str, torch.Tensor], cfg: dict, wpath: Path, family: str | None = None) -> Adapter:
    rslora = bool(cfg.get("use_rslora"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        check_finite(t, key, wpath)
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _PART_RE.match(name)
        if m:
            mod, part = m.group(1), m.group(2)
            if not t.is_floating_point():
                raise InputError(f"tensor {key!r} has dtype {t.dtype}; LoRA tensors must be floating point", wpath)
            kind, field = PARTS[part]
            parts.setdefault(mod, {})[field] = t
            if kind:
                if kinds.setdefault(mod, kind) != kind:
                    raise InputError(f"module {mod!r} has both linear and embedding LoRA tensors", wpath)
        elif name.endswith(".base_layer.weight"):
            full[name[: -len(".base_layer.weight")] + ".weight"] = t
        elif re.search(r"\.modules_to_save\.[^.]+\.", name):
            full[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = t
        elif "lora_" in name or ".trainable_tokens" in name:
            raise UnsupportedError(f"unrecognised adapter tensor {key!r}", wpath)
        else:
            full[name] = t
    family = adapter_family(cfg, parts, family)
    layout = px.layout_for(family)
    tp = cfg.get("target_parameters") or []
    expert_mods = px.fused_modules(parts, cfg, layout, wpath)  # target_parameters on mlp.experts -> per expert
    modules: dict[str, LoraModule] = {}
    for mod, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            have, miss = ("A", "B") if "A" in p else ("B", "A")
            raise InputError(f"module {mod!r} has lora_{have} but no lora_{miss}", wpath)
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise InputError(f"module {mod!r}: LoRA factors must be 2-D (conv LoRA is not supported), got {tuple(A.shape)} and {tuple(B.shape)}", wpath)
        if A.shape[0] != B.shape[1]:
            raise InputError(f"module {mod!r}: lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; their ranks disagree", wpath)
        # a 2-D parameter targeted with target_parameters (a router's weight) is matched by its parameter name
        r_cfg, alpha = resolve_rank_alpha(cfg, f"{mod}.weight" if px.targets_param(f"{mod}.weight", tp) else mod)
        r = int(A.shape[0])
        if r != r_cfg:
            raise InputError(f"module {mod!r}: weights have rank {r} but adapter_config.json (r / rank_pattern) says {r_cfg}", wpath)
        kind = kinds.get(mod, "linear")
        mag = p.get("magnitude")
        if mag is not None and kind == "embedding":
            raise UnsupportedError(f"module {mod!r}: DoRA on embeddings is not supported", wpath)
        if mag is not None and mag.shape != (B.shape[0],):
            raise InputError(f"module {mod!r}: DoRA magnitude has shape {tuple(mag.shape)}, expected ({B.shape[0]},)", wpath)
        bias = p.get("bias")
        if bias is not None and bias.shape != (B.shape[0],):
            raise InputError(f"module {mod!r}: lora_B.bias has shape {tuple(bias.shape)}, expected ({B.shape[0]},)", wpath)
        name = px.canonical_router(mod, layout) if layout is not None and px.is_router(mod, layout) else mod
        modules[name] = LoraModule(A=A, B=B, scale=lora_scale(alpha, r, rslora), alpha=alpha, bias=bias, kind=kind, magnitude=mag)
    for name, m in expert_mods.items():
        if name in modules:
            raise InputError(f"expert module {name!r} has LoRA both per expert and in the fused target_parameters form", wpath)
        modules[name] = m
    num_experts = None
    if expert_mods:
        num_experts = max(int(px._CANON_RE.match(n).group("e")) for n in expert_mods) + 1
    if cfg.get("use_dora") and not any(m.magnitude is not None for m in modules.values()):
        raise InputError("use_dora is true but the weights have no lora_magnitude_vector", wpath)
    if not cfg.get("use_dora") and any(m.magnitude is not None for m in modules.values()):
        # PEFT would build plain LoRA layers and ignore the magnitudes: say so rather than guess
        raise InputError("the weights have lora_magnitude_vector (DoRA) but adapter_config.json has use_dora false", wpath)
    if not modules and not full:
        raise InputError("adapter holds no LoRA tensors", wpath)
    return Adapter(modules=modules, modules_to_save=full, config=dict(cfg), source=str(wpath.parent), format="peft",
                   family=family, num_experts=num_experts)


# -- writing -------------------------------------------------------------------------------
def _target_modules(names: list[str], num_layers: int | None = None) -> list[str]:
    """Leaf names (``q_proj``) when each layered leaf covers the same layers 0..L-1 (L =
    ``num_layers`` when known), so that PEFT targets exactly these modules; else full names."""
    layer_sets: dict[str, set[int]] = {}
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        layer_sets.setdefault(n.rpartition(".")[2], set()).add(int(m.group(1)) if m else -1)
    layered = [s for s in layer_sets.values() if -1 not in s]
    mixed = any(-1 in s and len(s) > 1 for s in layer_sets.values())
    if layered and not all(n.startswith("model.layers.") or not re.search(r"\.(\d+)\.", n) for n in names):
        return sorted(names)  # a multimodal model (model.language_model.layers...): leaf names would reach its vision tower
    if layered and num_layers is None:
        return sorted(names)  # without the base's layer count, leaf names could reach layers we lack
    if layered:
        full = set(range(num_layers))
        if mixed or any(s != full for s in layered):
            return sorted(names)
    return sorted(layer_sets)


def peft_config_for(adapter: Adapter, base_model_name_or_path: str | None = None, num_layers: int | None = None,
                    fused: dict | None = None, param_modules: tuple = (), force: tuple | None = None) -> dict:
    """adapter_config.json for ``adapter``. ``fused`` (in-memory parameter name -> FusedParam) and
    ``param_modules`` (modules of ``adapter`` targeted as their ``.weight`` parameter: routers) go
    to target_parameters, their rank/alpha patterns keyed by parameter name as PEFT matches them.
    ``force`` = (r, scale): the global r and the lora_alpha giving that scale (per-expert form)."""
    mods = adapter.modules
    fused = fused or {}
    if not mods and not adapter.modules_to_save and not fused:
        raise LoratoolsError("nothing to write: the adapter has no LoRA modules left (every rank came out 0?) "
                             "and no modules_to_save")
    if not mods and not fused:
        raise UnsupportedError("PEFT cannot load an adapter that holds only modules_to_save "
                               f"({', '.join(sorted(adapter.modules_to_save))}): it needs at least one LoRA module", adapter.source or None)
    emb = sorted(n for n, m in mods.items() if m.kind == "embedding")
    if emb and any(m.bias is not None for m in mods.values()):
        raise UnsupportedError(f"PEFT cannot load lora_bias together with embedding LoRA ({', '.join(emb)}): "
                               "its embedding layers refuse lora_bias=True", adapter.source or None)
    params = bool(fused or param_modules)
    if params:
        for what, bad in (("lora_bias", [n for n, m in mods.items() if m.bias is not None]),
                          ("DoRA", [n for n, m in mods.items() if m.magnitude is not None])):
            if bad:
                raise UnsupportedError(f"PEFT refuses {what} in an adapter with target_parameters (expert or router "
                                       f"LoRA); {what} is on {', '.join(sorted(bad)[:3])}", adapter.source or None)
    rslora = adapter.use_rslora
    # (rank, scale) of every PEFT target, keyed by the name PEFT matches rank_pattern / alpha_pattern against
    entries = {(f"{n}.weight" if n in param_modules else n): (m.rank, m.scale, m.alpha) for n, m in mods.items()}
    entries.update({n: (fp.rank, fp.scale, None) for n, fp in fused.items()})
    ranks = Counter(r for r, _, _ in entries.values())
    r = ranks.most_common(1)[0][0] if ranks else 8
    if force is not None:
        r = force[0]
    alphas = {}
    for name, (rk, sc, a) in entries.items():
        if a is None or lora_scale(a, rk, rslora) != sc:
            a = alpha_for_scale(sc, rk, rslora)
        alphas[name] = int(a) if float(a).is_integer() else float(a)
    common_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 2 * r
    if force is not None:
        a = alpha_for_scale(force[1], force[0], rslora)
        common_alpha = int(a) if float(a).is_integer() else float(a)
    rank_pattern = {n: rk for n, (rk, _, _) in sorted(entries.items()) if rk != r}
    alpha_pattern = {n: a for n, a in sorted(alphas.items()) if a != common_alpha}
    mts = sorted({k.rsplit(".", 1)[0] for k in adapter.modules_to_save if k.rsplit(".", 1)[0] not in mods})
    old = adapter.config if adapter.format == "peft" else {}
    plain = sorted(n for n in mods if n not in param_modules)
    targets = _target_modules(plain, num_layers) if plain else []
    cfg = {
        "peft_type": "LORA",
        "task_type": old.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model_name_or_path if base_model_name_or_path is not None else old.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": common_alpha,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "use_dora": any(m.magnitude is not None for m in mods.values()),
        "lora_bias": any(m.bias is not None for m in mods.values()),
        "modules_to_save": mts or None,
        "lora_dropout": 0.0 if params else old.get("lora_dropout", 0.0),  # PEFT's ParamWrapper refuses dropout
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": old.get("revision"),
    }
    if params:
        # as PEFT users write them: the names below the layer ("mlp.experts.gate_up_proj"), which PEFT matches as
        # suffixes; a layer without LoRA for one of them gets PEFT's zero-initialised B (no effect). SGLang's
        # loader expects this short form (it refuses more than the two expert parameters, see runtimes/moe_lora.py)
        cfg["target_parameters"] = sorted({re.sub(r"^.*\.layers\.\d+\.", "", n)
                                           for n in list(fused) + [f"{n}.weight" for n in param_modules]})
    if adapter.config.get("loratools"):
        cfg["loratools"] = adapter.config["loratools"]
    return cfg


def peft_state_dict(adapter: Adapter, fused: dict | None = None) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = px.fused_keys(fused or {}, PREFIX)
    for name, m in sorted(adapter.modules.items()):
        p = PREFIX + name
        if m.kind == "embedding":
            sd[f"{p}.lora_embedding_A"] = m.A
            sd[f"{p}.lora_embedding_B"] = m.B
        else:
            sd[f"{p}.lora_A.weight"] = m.A
            sd[f"{p}.lora_B.weight"] = m.B
            if m.bias is not None:
                sd[f"{p}.lora_B.bias"] = m.bias
        if m.magnitude is not None:
            sd[f"{p}.lora_magnitude_vector"] = m.magnitude
    for key, t in sorted(adapter.modules_to_save.items()):
        mod, _, leaf = key.rpartition(".")
        if mod in adapter.modules:  # full weight of a LoRA-targeted layer (save_embedding_layers)
            sd[f"{PREFIX}{mod}.base_layer.{leaf}"] = t
        else:
            sd[PREFIX + key] = t
    return {k: v.contiguous() for k, v in sd.items()}


def expert_modules(adapter: Adapter) -> list[str]:
    return [n for n in adapter.modules if px.is_expert_name(n)]


def write_peft(adapter: Adapter, out: str | os.PathLike, base_model_name_or_path: str | None = None,
               num_layers: int | None = None, extra_files: dict[str, str] | None = None,
               expert_form: str | None = None, family: str | None = None, num_experts: int | None = None) -> Path:
    """Write ``adapter`` as a PEFT adapter folder, atomically. ``num_layers`` (of the base)
    lets target_modules use leaf names only when they cover every layer; ``extra_files``
    (name -> text) are written into the same folder (reports).

    Expert LoRA (canonical per-expert modules) is written in ``expert_form``: "fused" (the
    default: PEFT's target_parameters on the fused ``mlp.experts`` parameters, what a transformers 5
    model has) or "per_expert" (transformers 4.x module names, which PEFT converts when it loads
    them into a transformers 5 model). ``family`` / ``num_experts`` default to the adapter's."""
    from ..arch.layout import memory_adapter
    from ..arch.registry import FAMILIES

    adapter = memory_adapter(adapter)  # PEFT names modules as transformers holds them (multimodal Gemma 3)
    form = (expert_form or "fused").replace("-", "_")
    if form not in px.EXPERT_FORMS:
        raise InputError(f"unknown expert form {expert_form!r} (fused or per-expert)")
    family = family or adapter.family
    num_experts = num_experts or adapter.num_experts
    layout = px.layout_for(family)
    experts = expert_modules(adapter)
    routers = [n for n in adapter.modules if px.is_router(n, layout or px.DEFAULT_LAYOUT) or
               (layout is None and px.is_router(n, px.layout_for("mixtral")))]
    fused: dict = {}
    param_modules: tuple = ()
    force = None
    if experts or routers:
        if layout is None and family is not None and family in FAMILIES:
            raise UnsupportedError(f"the adapter has expert or router LoRA but its base family {family!r} has no "
                                   "mixture-of-experts blocks", adapter.source or None)
        if layout is None:
            # no family: the names tell Mixtral's layout; any other per-expert name is the stacked gate/up layout
            # (gpt-oss, the one interleaved family, never had per-expert names, and its adapters carry the family)
            mixtral = any(".block_sparse_moe." in n for n in experts + routers)
            layout = px.layout_for("mixtral") if mixtral else px.DEFAULT_LAYOUT
            routers = [n for n in adapter.modules if px.is_router(n, layout)]
        if form == "fused":
            mods = {(px.memory_router(n, layout) if n in routers else n): m for n, m in adapter.modules.items()}
            rest, fused = px.fuse_experts(mods, layout, num_experts)
            param_modules = tuple(px.memory_router(n, layout) for n in routers)
            adapter = replace(adapter, modules=rest)
        else:
            if not layout.per_expert_modules:
                raise UnsupportedError(f"{family} has no per-expert modules in any transformers version (its experts "
                                       "were always fused parameters), so PEFT cannot load a per-expert form; write "
                                       "--expert-form fused", adapter.source or None)
            if layout.family is not None and layout.family not in px.PEFT_CONVERTS_PER_EXPERT:
                raise UnsupportedError(f"PEFT (0.21) does not convert per-expert adapters of {layout.family} models to "
                                       "transformers 5's fused experts, so PeftModel cannot load this form; write "
                                       "--expert-form fused", adapter.source or None)
            mods = {(px.canonical_router(n, layout) if n in routers else n): m for n, m in adapter.modules.items()}
            # PEFT's v4 -> v5 conversion ignores rank_pattern / rsLoRA on these modules: one rank and scale for all
            adapter = replace(adapter, modules=px.pad_per_expert(mods, layout),
                              config={**adapter.config, "use_rslora": False} if adapter.use_rslora else adapter.config)
            m0 = next(m for n, m in adapter.modules.items() if px.is_expert_name(n) or px.is_router(n, layout))
            force = (m0.rank, m0.scale)
    cfg = peft_config_for(adapter, base_model_name_or_path, num_layers, fused, param_modules, force)
    sd = peft_state_dict(adapter, fused)
    with atomic_dir(out) as tmp:
        st.save_file(sd, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)
