"""The Python API: a function per command. The CLI only parses options, calls these functions
and prints what they return.

The tensor operations (inspect, convert, merge, unmerge, extract, resize, combine, scale,
subtract) need no architecture: adapters are matched to a checkpoint's tensors by name and shape,
and config.json is read only for what ``loratools.modelinfo`` names. The paths that run the
model (forward, validate, export gguf / onnx, train) need an architecture loratools knows, and
say in one line which model_type is missing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import st
from .adapter import Adapter
from .checkpoint import Checkpoint
from .errors import IncompatibleError, InputError
from .formats import kohya, peft
from .fsutil import check_output
from .modelinfo import read_model_info, tied_pair, with_tied_head
from .models.decoder import load_model
from .ops.extract import REPORT as EXTRACT_REPORT  # noqa: F401 - the CLI names the report file

__all__ = ["load_adapter", "save_adapter", "inspect", "forward", "convert_adapter", "Checkpoint", "load_model",
           "Adapter", "RankRule", "extract", "resize", "combine", "scale", "subtract", "merge", "unmerge",
           "export_gguf", "export_gguf_adapter", "export_onnx", "export_onnx_adapter", "import_gguf", "train",
           "validate", "validate_extraction", "read_prompts", "forward_report", "check_plot", "generate",
           "convert_for_runtime"]


def detect(path: str | os.PathLike) -> str:
    """'peft', 'kohya', 'checkpoint' or raise InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", p)
    if p.is_dir():
        if (p / peft.CONFIG).is_file():
            return "peft"
        if (p / "config.json").exists() or (p / "config.json").is_symlink():
            return "checkpoint"  # read under the read policy, which names what is wrong with it
        raise InputError("neither an adapter (adapter_config.json) nor a checkpoint (config.json)", p)
    if p.name == peft.CONFIG or p.name == peft.WEIGHTS:
        return "peft"
    if p.suffix == ".safetensors":
        if kohya.is_kohya_file(p):
            return "kohya"
        st.read_header(p)  # raises a clear error for a corrupt file
        return "checkpoint"
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return "checkpoint"
    raise InputError("unrecognised file type (expected a folder, .safetensors, or a pickle checkpoint)", p)


def _module_names(base: str | os.PathLike | None) -> list[str] | None:
    if base is None:
        return None
    with Checkpoint.open(base) as ck:
        return [k.rsplit(".", 1)[0] for k in ck.keys() if k.endswith(".weight")]


def _base_family(base) -> str | None:
    """model_type of a base model folder (the expert layout of MoE adapters), if any."""
    if base is None or not Path(base).is_dir() or not (Path(base) / "config.json").is_file():
        return None
    return read_model_info(base).model_type


def load_adapter(path: str | os.PathLike, base: str | os.PathLike | None = None, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT folder or a kohya file. With ``base``, check that it fits the base model."""
    kind = detect(path)
    family = _base_family(base)
    if kind == "peft":
        a = peft.read_peft(path, allow_pickle=allow_pickle, family=family)
    elif kind == "kohya":
        a = kohya.read_kohya(path, _module_names(base))
    else:
        raise InputError("this is a model checkpoint, not an adapter", path)
    if base is not None:
        from .arch.experts import ExpertView, check_targets
        from .arch.layout import align_adapter

        info = read_model_info(base) if Path(base).is_dir() else None
        with Checkpoint.open(base) as ck:
            shapes = {k: ck.info(k).shape for k in ck.keys()}
            experts = ExpertView.of(ck)
        shapes = with_tied_head(shapes, tied_pair(info, shapes))
        shapes = _with_expert_shapes(shapes, info, a)  # canonical per-expert weights, whatever the stored layout
        aligned = experts.align(align_adapter(a, shapes))  # PEFT names vs the saved layout
        check_targets([aligned], shapes, experts, f"base model {base}")
        aligned.check_against(shapes, f"base model {base}")
    return a


def _with_expert_shapes(shapes: dict, info, a: Adapter | None = None) -> dict:
    """``shapes`` plus the canonical per-expert weights of an MoE base (whatever its stored layout);
    the adapter learns the base's expert count (fused expert LoRA is written for all experts)."""
    if info is None:
        return shapes
    from .arch.experts import ExpertView

    view = ExpertView.from_shapes(shapes, info.raw)
    if not view:
        return shapes
    if a is not None and view.num_experts:
        a.num_experts = a.num_experts or max(view.num_experts.values())
        a.family = a.family or info.model_type
    return {**shapes, **{n: w.shape for n, w in view.weights.items()}}


def _num_layers(base) -> int | None:
    """The base's num_hidden_layers (PEFT target lists by leaf name), when there is a base."""
    return read_model_info(base).num_hidden_layers if base else None


def save_adapter(adapter: Adapter, out: str | os.PathLike, fmt: str = "peft", overwrite: bool = False,
                 inputs: Iterable = (), num_layers: int | None = None, expert_form: str | None = None) -> Path:
    """Write ``adapter``; ``expert_form`` ("fused", the default, or "per_expert"): how PEFT expert LoRA is written."""
    check_output(out, inputs, overwrite, file=fmt != "peft")  # kohya: one .safetensors file
    if fmt == "peft":
        return peft.write_peft(adapter, out, num_layers=num_layers, expert_form=expert_form)
    if expert_form is not None and any(peft.px.is_expert_name(n) for n in adapter.modules):
        raise InputError(f"--expert-form applies to PEFT output, not {fmt}")
    if fmt == "kohya":
        return kohya.write_kohya(adapter, out)
    raise InputError(f"unknown adapter format {fmt!r} (peft or kohya)")


def convert_adapter(src: str | os.PathLike, out: str | os.PathLike, fmt: str, base=None, overwrite=False,
                    expert_form: str | None = None, include=None, exclude=None, report: dict | None = None) -> Path:
    """Convert (and with ``include``/``exclude`` regexes, select modules by name: extract's rule);
    ``report``, when given, receives the modules dropped."""
    from .ops.common import check_patterns, select_adapter

    check_patterns(include, exclude)
    a, dropped = select_adapter(load_adapter(src, base), include, exclude)
    if report is not None:
        report["dropped"] = dropped
    return save_adapter(a, out, fmt, overwrite=overwrite, inputs=[src, base], num_layers=_num_layers(base),
                        expert_form=expert_form)


def convert_for_runtime(src, out, runtime: str, max_rank: int | None = None, base=None, max_kl: float | None = None,
                        prompts=None, overwrite: bool = False, device: str = "cpu") -> dict:
    """An adapter the named runtime (vllm, sglang, llama.cpp, onnxruntime) loads, computing what
    ``src`` computes as closely as it allows; the report says what each lossy step cost
    (loratools.ops.serve). ``prompts``: strings or a prompt file's path (the KL check, with ``base``)."""
    from .ops.serve import convert_for_runtime as run

    if isinstance(prompts, (str, os.PathLike)):
        check_output(out, [src, base, prompts], overwrite)  # the prompt file is an input too
        prompts = read_prompts(prompts)
    return run(src, runtime, out, max_rank, base, max_kl, prompts, overwrite, device)


# -- inspect -----------------------------------------------------------------------------------
def _vllm_ranks() -> tuple:
    from .runtimes.profiles import PROFILES

    return PROFILES["vllm"].ranks


VLLM_RANKS = _vllm_ranks()  # the serving profile's (runtimes/profiles.py)


def compat_warnings(a: Adapter) -> dict[str, list[str]]:
    """What each target runtime will do with this adapter, as far as loratools knows."""
    vllm, llama, ort, peft_w = [], [], [], []
    ranks = {m.rank for m in a.modules.values()}
    rmax = max(ranks) if ranks else 0
    has = lambda f: [n for n, m in a.modules.items() if f(m)]  # noqa: E731
    dora, bias, emb = has(lambda m: m.magnitude is not None), has(lambda m: m.bias is not None), has(lambda m: m.kind == "embedding")
    patterns = bool(a.config.get("alpha_pattern")) or len({m.scale for m in a.modules.values()}) > 1
    if a.modules_to_save:
        vllm.append(f"refuses modules_to_save ({', '.join(sorted(a.modules_to_save))})")
        llama.append("cannot carry modules_to_save (full tensors); merge them into the model instead")
    if dora:
        vllm.append("refuses DoRA (use_dora)")
        llama.append("refuses DoRA (use_dora); merge the adapter into the model instead")
        ort.append("ONNX Runtime's adapter format has no DoRA; export a merged model")
    if bias:
        vllm.append("refuses lora_bias (lora_B.bias)")
    if emb:
        vllm.append(f"embedding LoRA ({', '.join(emb)}) is not supported by current vLLM releases")
    if rmax > 16:
        vllm.append(f"max rank {rmax} exceeds vLLM's default --max-lora-rank 16; start vLLM with --max-lora-rank {min(r for r in VLLM_RANKS if r >= rmax) if rmax <= 512 else rmax}")
    if rmax > 512 or any(r not in VLLM_RANKS for r in ranks if r > 8):
        vllm.append(f"ranks {sorted(ranks)} include values vLLM's --max-lora-rank choices {VLLM_RANKS} do not list; pad or resize")
    if a.config.get("alpha_pattern"):
        vllm.append("ignores alpha_pattern: those modules would get scale lora_alpha/r (loratools resize can fold it)")
    if patterns or a.use_rslora:
        llama.append("llama.cpp applies one alpha per file; rank_pattern/alpha_pattern/rsLoRA scales must be folded "
                     "into B on export (loratools export gguf-adapter does this; llama.cpp's convert_lora_to_gguf.py does not)")
    if a.format == "kohya":
        peft_w.append("kohya format: convert with `loratools convert --to peft` to load it in PEFT")
    out = {"vllm": vllm, "llama.cpp": llama, "onnxruntime": ort, "peft": peft_w}
    summary = peft.px.expert_summary(a.modules, a.family)
    if summary:  # mixture-of-experts LoRA: what each serving runtime does with it (runtimes/moe_lora.py)
        from .runtimes.moe_lora import moe_runtime_notes

        fused = bool(a.config.get("target_parameters")) if a.format == "peft" else None
        notes = moe_runtime_notes(summary, fused)
        out["vllm"] += notes.get("vLLM", [])
        out["llama.cpp"] += notes.get("llama.cpp", [])
        out["sglang"] = notes.get("SGLang", [])
        if summary.get("routed") and a.format == "peft" and not fused:
            peft_w.append("per-expert (transformers 4.x) form: PEFT converts it to the fused experts of a "
                          "transformers 5 model only for " + ", ".join(peft.px.PEFT_CONVERTS_PER_EXPERT) +
                          "; `loratools convert --to peft --expert-form fused` writes the target_parameters form")
    return out


def inspect_adapter(a: Adapter, path) -> dict:
    from .ops.common import natural_key

    dtypes = sorted({st.DTYPE_NAMES.get(m.A.dtype, str(m.A.dtype)) for m in a.modules.values()})
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else Path(path).stat().st_size
    mods = {n: {"kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale, "in": m.in_features,
                "out": m.out_features, "params": m.num_parameters(), "bias": m.bias is not None,
                "dora": m.magnitude is not None} for n, m in sorted(a.modules.items(), key=lambda kv: natural_key(kv[0]))}
    return {"type": "adapter", "format": a.format, "path": str(path), "modules": mods,
            "num_modules": len(mods), "ranks": sorted({m.rank for m in a.modules.values()}),
            "use_rslora": a.use_rslora, "use_dora": a.use_dora,
            "modules_to_save": {k: list(t.shape) for k, t in sorted(a.modules_to_save.items(), key=lambda kv: natural_key(kv[0]))},
            "parameters": a.num_parameters(), "dtypes": dtypes, "size_bytes": size,
            "base_model_name_or_path": a.config.get("base_model_name_or_path"),
            "experts": peft.px.expert_summary(a.modules, a.family),
            "warnings": compat_warnings(a)}


def inspect_checkpoint(path, allow_pickle: bool = False) -> dict:
    """Names, shapes, dtypes and shards of any checkpoint; the architecture's hyper-parameters
    when loratools knows its model_type (else what modelinfo reads: tied embeddings, layers)."""
    from .errors import UnsupportedError
    from .models.config import load_config

    info = read_model_info(path) if Path(path).is_dir() else None
    cfg = why = None
    if info is not None:
        try:
            cfg = load_config(path)
        except UnsupportedError as e:  # a family (or feature) loratools cannot run: its tensors are still described
            from .errors import one_line

            why = one_line(e.message)
    with Checkpoint.open(path, allow_pickle=allow_pickle, require_config=info is not None) as ck:
        keys = ck.keys()
        out = {"type": "checkpoint", "path": str(path), "parameters": ck.num_parameters, "tensors": len(ck.keys()),
               "dtypes": ck.dtypes(), "size_bytes": ck.total_bytes,
               "shards": [{"file": f.name, "tensors": len(names), "bytes": sum(ck.info(n).nbytes for n in names)}
                          for f, names in ck.by_shard()],
               "largest_tensor": max(((ck.info(n).nbytes, n) for n in ck.keys()), default=(0, None))[1]}
    if info is not None and cfg is None:
        out.update({"architecture": info.model_type, "architectures": info.raw.get("architectures"),
                    "known_architecture": False, "not_runnable": why, "num_hidden_layers": info.num_hidden_layers,
                    "tie_word_embeddings": tied_pair(info, keys) is not None})
    if cfg is not None:
        out.update({"architecture": cfg.model_type, "architectures": cfg.raw.get("architectures"),
                    "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                    "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                    "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                    "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
                    "rope_scaling": cfg.rope_scaling})
    return out


def check_plot(plot, inputs, overwrite: bool, output=None) -> None:
    """Before any work: a --plot path matplotlib can write, not an input, not an existing file
    without --overwrite (a plot inside the command's new output folder is checked there)."""
    p = Path(plot)
    if p.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError("--plot must name a .png, .svg or .pdf file", plot)
    if output is not None and p.resolve().parent == Path(output).resolve():
        return
    check_output(p, inputs, overwrite, file=True)


def inspect(path: str | os.PathLike, allow_pickle: bool = False, base: str | os.PathLike | None = None,
            plot: str | os.PathLike | None = None, overwrite: bool = False, for_runtime: str | None = None) -> dict:
    """Describe an adapter or a checkpoint; ``plot``: also draw an adapter's spectra there;
    ``for_runtime``: what that runtime would refuse or read differently (``serving``)."""
    if for_runtime is not None:
        from .runtimes.profiles import profile

        profile(for_runtime)  # an unknown runtime is an error before any work
    if plot:
        check_plot(plot, [path, base], overwrite)
    kind = detect(path)
    if kind == "checkpoint":
        d = inspect_checkpoint(path, allow_pickle)
    else:
        a = load_adapter(path, base=base, allow_pickle=allow_pickle)
        d = inspect_adapter(a, path)
        if for_runtime is not None:
            from .ops.serve import lint
            from .runtimes.profiles import profile

            prof = profile(for_runtime)
            issues = lint(a, prof)
            d["serving"] = {"runtime": prof.runtime, "profile": prof.version, "issues": issues,
                            "refused": any(i["action"] == "refuse" for i in issues)}
    if for_runtime is not None and d["type"] != "adapter":
        from .errors import UnsupportedError

        raise UnsupportedError("--for checks an adapter; this is a checkpoint", path)
    if plot:
        from .errors import UnsupportedError
        from .plot import adapter_spectra, plot_spectra

        if d["type"] != "adapter":
            raise UnsupportedError("--plot draws an adapter's spectra; this is a checkpoint", path)
        plot_spectra(adapter_spectra(a), plot, f"{path}: spectrum of each module's s·B·A")
        d["plot"] = str(plot)
    return d


# -- forward -----------------------------------------------------------------------------------
def tokenize(model_dir: str | os.PathLike, text: str) -> list[int]:
    from . import readpolicy

    p = Path(model_dir) / "tokenizer.json"
    if not p.exists() and not p.is_symlink():
        raise InputError("no tokenizer.json to encode the prompt (forward takes --ids instead of a prompt)", model_dir)
    tok = readpolicy.load_tokenizer(p)
    ids = tok.encode(text, add_special_tokens=True).ids
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    return ids


def forward(model_dir: str | os.PathLike, ids: Sequence[int], adapters: Sequence[str | os.PathLike] = (),
            weights: Sequence[float] | None = None, device: str = "auto", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits (len(ids), vocab) of the reference model with ``adapters`` applied unmerged."""
    loaded = [load_adapter(a, base=model_dir) for a in adapters]
    if weights is not None and len(weights) != len(loaded):
        raise IncompatibleError(f"{len(weights)} weights given for {len(loaded)} adapters")
    model = load_model(model_dir, dtype=dtype, device=device, adapters=loaded, weights=weights)
    vocab = model.cfg.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    with torch.no_grad():
        x = torch.tensor([list(ids)], device=model.inv_freq.device)
        logits, _ = model(x)
    return logits[0].cpu()


def top_tokens(logits: torch.Tensor, k: int, model_dir) -> list[dict]:
    """The k largest logits of one position, with their tokens decoded (ids when no tokenizer)."""
    vals, idx = logits.topk(min(k, logits.numel()))
    try:
        from . import readpolicy
        tok = readpolicy.load_tokenizer(Path(model_dir) / "tokenizer.json")
        dec = lambda i: tok.decode([i])  # noqa: E731
    except Exception:  # noqa: BLE001 - decoding is cosmetic
        dec = str
    return [{"id": int(i), "token": dec(int(i)), "logit": float(v)} for v, i in zip(vals, idx)]


def forward_report(model_dir, ids: Sequence[int], adapters: Sequence = (), weights: Sequence[float] | None = None,
                   top_k: int = 5, device: str = "auto") -> dict:
    """The forward command: next-token predictions with and without the adapters."""
    toks = list(ids)
    base = forward(model_dir, toks, device=device)
    d = {"model": model_dir, "tokens": toks, "device": device, "base_top": top_tokens(base[-1], top_k, model_dir)}
    if adapters:
        adapted = forward(model_dir, toks, adapters, weights, device=device)
        d["adapters"] = list(adapters)
        d["adapted_top"] = top_tokens(adapted[-1], top_k, model_dir)
        d["max_abs_logit_change"] = float((adapted - base).abs().max())
        d["top1_changed_positions"] = int((adapted.argmax(-1) != base.argmax(-1)).sum())
    return d


def generate(model, adapters: Sequence = (), weights: Sequence[float] | None = None, prompt: str | None = None,
             chat=None, max_new_tokens: int = 32, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, device: str = "auto", stop_at_eos: bool = True) -> dict:
    """Generate text: the reference decoder (a checkpoint folder + adapters unmerged), a .gguf in
    llama.cpp or an ONNX folder in ONNX Runtime; ``chat``: messages rendered with the model's
    chat template. Greedy unless ``greedy`` is off (seeded sampling, reference only)."""
    from .generate import generate as run

    return run(model, adapters, weights, prompt, chat, max_new_tokens, greedy, temperature, top_p, seed, device,
               stop_at_eos)


# -- re-factorization ---------------------------------------------------------------------------
def RankRule(kind: str = "rank", value: float = 16, max_rank: int | None = None):  # noqa: N802 - a constructor
    """A rank rule (rank, energy, fro, ratio, threshold; an optional cap) for extract and resize."""
    from .ops.factor import RankRule as _Rule

    return _Rule(kind, value, max_rank)


def extract(base, tuned, out, rule=None, *, budget=None, exact: bool = False, include: str | None = None,
            exclude: str | None = None, embeddings: str = "lora", device: str = "auto", seed: int = 0,
            oversample: int = 16, power_iters: int = 4, dtype: str | torch.dtype = "fp32", overwrite: bool = False,
            quiet: bool = True, plot=None, expert_form: str | None = None) -> tuple[Adapter, dict]:
    """Extract a LoRA from a full fine-tune (written as PEFT to ``out``); ``plot``: draw the spectra."""
    from .ops.common import parse_dtype
    from .ops.extract import extract as run

    rule = rule if rule is not None else RankRule()
    dt = parse_dtype(dtype, False) if isinstance(dtype, str) else dtype
    if plot:
        check_plot(plot, [base, tuned], overwrite, out)
    a, rep = run(base, tuned, out, rule, budget=budget, exact=exact, include=include, exclude=exclude,
                 embeddings=embeddings, device=device, seed=seed, oversample=oversample, power_iters=power_iters,
                 dtype=dt, overwrite=overwrite, quiet=quiet, expert_form=expert_form, full_spectra=bool(plot))
    spectra = rep.pop("_spectra", {})
    if plot:
        from .plot import plot_spectra

        plot_spectra(spectra, plot, f"extract {tuned} − {base}: {rep['rule']}")
        rep["plot"] = str(plot)
    return a, rep


def _itemsize(dt) -> int:
    return torch.empty((), dtype=dt or torch.float32).element_size()


def resize(adapter, out, rule=None, *, budget: str | None = None, base=None, fmt: str | None = None,
           dtype: str = "keep", overwrite: bool = False, expert_form: str | None = None,
           include=None, exclude=None) -> tuple[Adapter, dict]:
    """Shrink an adapter's ranks optimally and write it (format: the input's unless ``fmt``);
    ``include``/``exclude``: regexes selecting modules by name (extract's rule)."""
    from .ops.common import check_patterns, parse_dtype
    from .ops.factor import parse_budget
    from .ops.resize import resize as run

    check_patterns(include, exclude)
    rule = rule if rule is not None else RankRule()
    a = load_adapter(adapter, base=base)
    dt = parse_dtype(dtype)
    bp = parse_budget(budget, _itemsize(dt or a.dtype())) if budget else None
    res, rep = run(a, rule, bp, dt, include=include, exclude=exclude)
    rep["format"] = fmt or a.format
    save_adapter(res, out, rep["format"], overwrite=overwrite, inputs=[adapter, base], num_layers=_num_layers(base),
                 expert_form=expert_form)
    return res, rep


def combine(adapters: Sequence, out, weights: Sequence[float] | None = None, method: str = "linear",
            rank: int | None = None, density: float = 1.0, seed: int = 0, base=None, fmt: str = "peft",
            overwrite: bool = False, expert_form: str | None = None) -> tuple[Adapter, dict, list[str]]:
    """Combine adapters and write the result: (adapter, report, the warnings the inputs raised)."""
    import warnings

    from .errors import LoratoolsError
    from .ops.combine import combine as run

    if rank is not None and method in ("linear", "cat"):
        raise LoratoolsError(f"--rank does not apply to --method {method} (its rank follows from the inputs'); "
                             "use --method svd for a chosen rank, or resize the result")
    loaded = [load_adapter(a, base=base) for a in adapters]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(loaded, weights, method, rank, density, seed)
    save_adapter(res, out, fmt, overwrite=overwrite, inputs=list(adapters) + [base], num_layers=_num_layers(base),
                 expert_form=expert_form)
    rep = {"inputs": list(adapters), "out": out, "method": method, "modules": len(res.modules),
           "ranks": res.ranks, "parameters": res.num_parameters()}
    return res, rep, [str(w.message) for w in caught]


def scale(adapter, factor: float, out, overwrite: bool = False) -> tuple[Adapter, dict]:
    """ΔW' = factor · ΔW, written in the input's format."""
    from .ops.combine import scale_adapter

    a = load_adapter(adapter)
    res = scale_adapter(a, factor)
    save_adapter(res, out, a.format, overwrite=overwrite, inputs=[adapter])
    return res, {"input": adapter, "out": out, "factor": factor, "format": a.format}


def subtract(adapter, other, out, overwrite: bool = False) -> tuple[Adapter, dict]:
    """ADAPTER − OTHER exactly (stacked factors), written as PEFT."""
    from .ops.combine import combine as run

    res = run([load_adapter(adapter), load_adapter(other)], [1.0, -1.0], "cat")
    save_adapter(res, out, "peft", overwrite=overwrite, inputs=[adapter, other])
    return res, {"inputs": [adapter, other], "out": out, "ranks": res.ranks}


def merge(base, adapters: Sequence, out, weights: Sequence[float] | None = None, dtype: str = "keep",
          max_shard_size="2GB", device: str = "auto", overwrite: bool = False, quiet: bool = True,
          unmerge: bool = False) -> dict:
    """Write base + Σ wᵢ·adapterᵢ (``unmerge``: base − …) as a checkpoint; streamed."""
    from .ops.common import parse_dtype
    from .ops.merge import merge as run

    loaded = [load_adapter(a, base=base) for a in adapters]
    return run(base, loaded, out, weights, parse_dtype(dtype), max_shard_size, device, overwrite,
               unmerge=unmerge, quiet=quiet)


def unmerge(base, adapters: Sequence, out, **kw) -> dict:
    return merge(base, adapters, out, unmerge=True, **kw)


# -- export / import ----------------------------------------------------------------------------
def gguf_outtypes() -> list[str]:
    """Every ``export gguf --outtype``: the in-house writer's, then llama.cpp quantizer's."""
    from .formats.gguf_quant import all_outtypes

    return all_outtypes()


def export_gguf(model, adapters: Sequence, out, weights=None, outtype: str = "f16", pre: str | None = None,
                overwrite: bool = False, quiet: bool = True, imatrix=None, calibration=None,
                save_imatrix=None) -> tuple[dict, list[str]]:
    """A llama.cpp GGUF model, adapters merged: (report, warnings raised while writing).
    ``imatrix`` (a llama-imatrix file) or ``calibration`` (text to compute one from, saved to
    ``save_imatrix``) for llama.cpp's quantized types."""
    import warnings

    from .formats.gguf_model import export_gguf as run

    loaded = [load_adapter(a, base=model) for a in adapters]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = run(model, out, loaded, weights, outtype, pre, overwrite, quiet, imatrix=imatrix,
                  calibration=calibration, save_imatrix=save_imatrix)
    return rep, [str(w.message) for w in caught]


def export_gguf_adapter(adapter, base, out, outtype: str = "f32", overwrite: bool = False) -> dict:
    from .formats.gguf_adapter import export_gguf_adapter as run

    return run(load_adapter(adapter, base=base), base, out, outtype, overwrite)


def export_onnx(model, adapters: Sequence, out, weights=None, dtype: str = "fp32", cache: bool = True,
                lora_slots: str | None = None, opset: int = 17, overwrite: bool = False, quiet: bool = True) -> dict:
    from .formats.onnx_model import export_onnx as run

    loaded = [load_adapter(a, base=model) for a in adapters]
    return run(model, out, loaded, weights, dtype, cache, lora_slots, opset, overwrite, quiet=quiet)


def export_onnx_adapter(adapter, out, base=None, slot_model=None, dtype: str = "fp32", overwrite: bool = False) -> dict:
    """ONNX Runtime's adapter file; with ``slot_model``, check every parameter has its slot
    there (when one does not, nothing is written and a previous ``out`` stays)."""
    from .errors import LoratoolsError
    from .formats.onnx_model import check_adapter_fits, export_onnx_adapter as run

    check_output(out, [adapter, base, slot_model], overwrite, file=True)
    check = None
    if slot_model:
        path = Path(slot_model) / "model.onnx" if Path(slot_model).is_dir() else Path(slot_model)

        def check(tmp: Path) -> None:  # on the new file before it replaces anything (a failure keeps the old)
            try:
                check_adapter_fits(path, tmp)
            except LoratoolsError as e:
                shown = e.message.replace(str(tmp), str(out))
                raise type(e)(shown, out if e.path == str(tmp) else e.path) from None

    return run(load_adapter(adapter, base=base), out, dtype, overwrite, check=check)


def import_gguf(path, out, dtype: str = "auto", overwrite: bool = False, quiet: bool = True) -> dict:
    from .formats.gguf_model import import_gguf as run

    return run(path, out, dtype, overwrite, quiet)


# -- train / validate ---------------------------------------------------------------------------
def train(model, data, out, eval_path=None, resume: bool = False, overwrite: bool = False, quiet: bool = True,
          log=None, **opts) -> dict:
    """Train a LoRA adapter (PEFT output); ``opts`` are TrainConfig's fields."""
    from .train.loop import TrainConfig, train as run

    return run(model, data, out, TrainConfig(**opts), eval_path, resume, overwrite, quiet,
               log=log if log is not None else (lambda m: None))


def read_prompts(path) -> list[str]:
    from .validate import read_prompts as run

    return run(path)


def validate(base, adapters: Sequence, candidates: Sequence, weights=None, prompts=None, tokens: int = 16,
             device: str = "auto", tolerances: dict | None = None, quiet: bool = True,
             quant_baseline: bool = True) -> dict:
    """Check that written artifacts compute what base + adapters compute, each in its runtime.
    ``prompts``: a list of strings, or a prompt file's path. ``quant_baseline``: a quantized GGUF is
    judged against llama.cpp's own file of its type made from the same weights."""
    from . import validate as v

    if isinstance(prompts, (str, os.PathLike)):
        prompts = v.read_prompts(prompts)
    return v.validate(base, adapters, candidates, weights, prompts, tokens, device, tolerances or {}, quiet=quiet,
                      quant_baseline=quant_baseline)


def validate_extraction(base, tuned, adapter, prompts=None, device: str = "auto", quiet: bool = True) -> dict:
    from . import validate as v

    if isinstance(prompts, (str, os.PathLike)):
        prompts = v.read_prompts(prompts)
    return v.validate_extraction(base, tuned, adapter, prompts, device, quiet=quiet)
