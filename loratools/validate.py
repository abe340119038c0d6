"""Numeric equivalence: does a written artifact compute what base + adapters compute?

The reference is the base model with the adapters applied unmerged, in loratools' torch model
in fp32. Each candidate runs in its own runtime — a checkpoint folder in torch, a ``.gguf`` (or
``base.gguf+adapter.gguf``) in llama.cpp, an ONNX folder (or ``dir+x.onnx_adapter``) in ONNX
Runtime — on the same token ids, and is compared on every prompt position:

- max and mean |Δlogit|; max relative error (max |Δ| over max |ref logit|, per position);
- KL(ref ‖ candidate) of the next-token distributions, mean and max over positions;
- top-1 agreement; greedy continuation of N tokens from each prompt, counted up to the first
  token that differs.

Pass/fail uses per-precision tolerances (TOLERANCES; overridable). With adapters, the yardstick is
their own effect: the base model without them against the reference, on the same metrics
(``adapter_effect``); a candidate whose mean KL exceeds it is flagged (``exceeds_adapter_effect``,
a warning): its error is larger than everything the adapters do.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import IncompatibleError, InputError, LoratoolsError

# precision -> (max mean KL, min top-1 agreement, min greedy agreement)
TOLERANCES = {
    "fp32": {"mean_kl": 1e-6, "top1": 1.0, "greedy": 1.0},
    "fp16": {"mean_kl": 1e-3, "top1": 0.95, "greedy": 0.5},
    "bf16": {"mean_kl": 1e-2, "top1": 0.90, "greedy": 0.25},
    "q8_0": {"mean_kl": 5e-2, "top1": 0.85, "greedy": 0.0},
    "q4": {"mean_kl": 0.5, "top1": 0.60, "greedy": 0.0},
}
DEFAULT_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. Numbers: 3.14159 and 2024.",
    "def forward(x):\n    return x @ W.T + scale * (x @ A.T) @ B.T\n",
]


@dataclass
class Candidate:
    spec: str
    kind: str            # "checkpoint" | "gguf" | "onnx"
    path: Path
    adapter: Path | None = None
    precision: str = "fp32"
    runtime: str = ""
    device: str = "cpu"


def _split_spec(spec: str) -> tuple[Path, Path | None]:
    """``MODEL`` or ``MODEL+ADAPTER``; either path may contain '+': a path that exists as written
    wins, then the first split at a '+' where both sides exist, else the last '+' (for the error)."""
    if Path(spec).exists() or "+" not in spec:
        return Path(spec), None
    cuts = [i for i, ch in enumerate(spec) if ch == "+"]
    for i in cuts:
        if Path(spec[:i]).exists() and Path(spec[i + 1:]).exists():
            return Path(spec[:i]), Path(spec[i + 1:])
    return Path(spec[:cuts[-1]]), Path(spec[cuts[-1] + 1:])


_ORDER = ["fp32", "fp16", "bf16", "q8_0", "q4"]  # finer to coarser


def _gguf_precision(kinds: set[str]) -> str:
    return ("fp32" if kinds <= {"F32"} else "fp16" if kinds <= {"F16", "F32"} else "bf16" if kinds <= {"BF16", "F32"}
            else "q8_0" if kinds <= {"Q8_0", "F32", "F16"} else "q4")


def parse_candidate(spec: str) -> Candidate:
    p, ad = _split_spec(spec)
    if not p.exists():
        raise InputError("no such file or directory", p)
    if ad is not None and not ad.exists():
        raise InputError("no such file or directory", ad)
    if p.suffix == ".gguf":
        from .formats.gguf_model import open_gguf

        mr = open_gguf(p)
        kinds = {t.tensor_type.name for t in mr.tensors if len(t.shape) > 1}
        if ad is not None:
            if ad.suffix != ".gguf":
                raise IncompatibleError("a GGUF model takes a GGUF adapter (.gguf) after '+'", ad)
            ar = open_gguf(ad)
            from .formats.gguf_model import field

            if field(ar, "general.type") != "adapter":
                raise IncompatibleError("not a GGUF LoRA adapter (general.type is not 'adapter')", ad)
            # llama.cpp does not survive an adapter for another model: check names and shapes first
            base = {t.name: [int(x) for x in t.shape] for t in mr.tensors}
            for t in ar.tensors:
                w, _, part = t.name.rpartition(".")
                shape = [int(x) for x in t.shape]
                # llama.cpp's rule: lora_a's ne[0] = the weight's ne[0], lora_b's ne[1] = its ne[1];
                # token_embd's factors are stored the other way round (a: ne[1] = ne[1], b: ne[1] = ne[0])
                if w == "token_embd.weight" and w in base and len(shape) == 2:
                    ok = shape[1] == (base[w][1] if part == "lora_a" else base[w][0])
                else:
                    # a stacked expert tensor (ne[2] = experts) takes 3-D factors, one slice per expert;
                    # a vector weight (Qwen2-MoE's shared-expert gate) is a 1-row matrix
                    bw = (base[w] + [1, 1])[:max(2, len(base[w]))] if w in base else None
                    ok = bw is not None and len(shape) == len(bw) and shape[0 if part == "lora_a" else 1] == \
                        bw[0 if part == "lora_a" else 1] and shape[2:] == bw[2:]
                if part not in ("lora_a", "lora_b") or not ok:
                    raise IncompatibleError(f"adapter tensor {t.name!r} {shape} does not fit the model {p}", ad)
            # the pair is as coarse as its coarser half (an f16 adapter on an f32 model: fp16)
            ad_prec = _gguf_precision({t.tensor_type.name for t in ar.tensors})
            prec = max(_gguf_precision(kinds), ad_prec, key=_ORDER.index)
            return Candidate(spec, "gguf", p, ad, prec, "llama.cpp")
        prec = _gguf_precision(kinds)
        return Candidate(spec, "gguf", p, ad, prec, "llama.cpp")
    if p.is_dir() and (p / "model.onnx").is_file():
        import onnx

        m = onnx.load(str(p / "model.onnx"), load_external_data=False)
        # the weights' type (logits are float32 even in fp16 exports, and --no-cache has no present.*)
        weights = [t.data_type for t in m.graph.initializer if len(t.dims) == 2 and min(t.dims) > 0]
        prec = "fp16" if weights and onnx.TensorProto.FLOAT16 in weights else "fp32"
        if ad is not None:
            if ad.suffix != ".onnx_adapter":
                raise IncompatibleError("an ONNX model takes an ONNX Runtime adapter (.onnx_adapter) after '+'", ad)
            from .formats.onnx_model import check_adapter_fits

            check_adapter_fits(p / "model.onnx", ad)
        return Candidate(spec, "onnx", p, ad, prec, "onnxruntime")
    if p.is_dir() and (p / "config.json").is_file():
        if ad is not None:
            raise InputError("a checkpoint candidate takes no '+adapter' (validate base + adapter is the reference)", ad)
        from .checkpoint import Checkpoint

        with Checkpoint.open(p) as ck:
            d = {i.dtype for n in ck.keys() for i in [ck.info(n)] if len(i.shape) > 1}
        prec = "fp32" if d <= {torch.float32} else "bf16" if torch.bfloat16 in d else "fp16"
        return Candidate(spec, "checkpoint", p, None, prec, "torch")
    raise InputError("not a candidate: expected a checkpoint folder, an ONNX folder or a .gguf file", p)


def kl_rows(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    r = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    c = torch.log_softmax(torch.from_numpy(cand).double(), -1)
    return (r.exp() * (r - c)).sum(-1).clamp_min(0).numpy()


def _greedy_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _torch_run(model, ids, n_new, dev):
    """The prompt's logits (numpy) and ``n_new`` greedy tokens from the reference decoder."""
    from .generate import decode

    logits, out = decode(model, ids, n_new, dev)
    return logits[0].float().cpu().numpy(), out


def _compare(refs, outs, tokens: int, spec: str = "the base model") -> tuple[list[dict], dict]:
    """Per-prompt and aggregate metrics of ``outs`` against ``refs`` ((logits, greedy ids) each)."""
    per = []
    for (rl, rg), (cl, cg) in zip(refs, outs):
        if cl.shape != rl.shape:
            raise IncompatibleError(f"logits are {cl.shape}, the reference's {rl.shape} (a different vocabulary?)", spec)
        d = np.abs(cl - rl)
        kl = kl_rows(rl, cl)
        per.append({"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                    "max_rel": float((d.max(-1) / np.abs(rl).max(-1).clip(1e-12)).max()),
                    "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                    "top1": float((cl.argmax(-1) == rl.argmax(-1)).mean()),
                    "greedy_match": _greedy_match(rg, cg) / tokens if tokens else 1.0,  # --tokens 0: nothing to compare
                    "worst_position": int(kl.argmax())})
    every = np.concatenate([kl_rows(rl, cl) for (rl, _), (cl, _) in zip(refs, outs)])
    agg = {"max_abs": max(p["max_abs"] for p in per), "mean_abs": float(np.mean([p["mean_abs"] for p in per])),
           "p99_kl": float(np.percentile(every, 99)),
           "max_rel": max(p["max_rel"] for p in per), "mean_kl": float(np.mean([p["mean_kl"] for p in per])),
           "max_kl": max(p["max_kl"] for p in per), "top1": float(np.mean([p["top1"] for p in per])),
           "greedy_match": float(np.mean([p["greedy_match"] for p in per]))}
    return per, agg


def perplexity(logits_list, ids_list) -> float:
    """exp(mean negative log-likelihood of each next prompt token), over all prompts' positions
    (as llama-perplexity scores a text)."""
    nll, n = 0.0, 0
    for lg, ids in zip(logits_list, ids_list):
        if len(ids) < 2:
            continue
        lp = torch.log_softmax(torch.from_numpy(np.asarray(lg[:-1])).double(), -1)
        nll -= float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        n += len(ids) - 1
    return math.exp(nll / n) if n else float("nan")


# a quantized GGUF passes when its mean KL is within this margin of llama.cpp's own quantizer's file of the
# same type made from the f32 export of the same weights: KL <= QUANT_KL_MARGIN x that + QUANT_KL_SLACK, and its
# top-1 agreement at most QUANT_TOP1_MARGIN below that file's (measured on SmolLM2: docs/benchmarks.md)
QUANT_KL_MARGIN = 1.10
QUANT_KL_SLACK = 1e-4
QUANT_TOP1_MARGIN = 0.03


def _file_outtype(path: Path) -> str | None:
    """The llama.cpp quantizer type (an --outtype) of a GGUF's general.file_type, None for f32/f16/bf16."""
    from .formats.gguf_model import field, open_gguf
    from .formats import gguf_quant

    ft = field(open_gguf(path), "general.file_type")
    if ft is None or not gguf_quant.available():
        return None
    names = {gguf_quant.ftype_of(t): t for t in gguf_quant.LLAMA_OUTTYPES}
    import llama_cpp

    names[int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)] = "q8_0"
    return names.get(int(ft))


def _quant_baseline(base, adapters, weights, outtype: str, workdir: Path) -> Path:
    """llama.cpp's own ``outtype`` file of the reference's weights: loratools' f32 export of base +
    adapters (merged), then llama_model_quantize, without an importance matrix."""
    from .formats import gguf_quant
    from .formats.gguf_model import _export

    f32 = workdir / "reference-f32.gguf"
    if not f32.exists():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export(base, f32, adapters, weights, "f32")
    out = workdir / f"reference-{outtype}.gguf"
    gguf_quant.quantize(f32, out, outtype)
    return out


def validate(base: str | os.PathLike, adapters: Sequence[str | os.PathLike], candidates: Sequence[str],
             weights: Sequence[float] | None = None, prompts: Sequence[str] | None = None, tokens: int = 16,
             device: str = "auto", tolerances: dict | None = None, peft_check: bool = True, quiet: bool = True,
             quant_baseline: bool = True) -> dict:
    """Each candidate against the reference (module docstring). ``quant_baseline``: judge a quantized
    GGUF against llama.cpp's own file of its type made from the f32 export of the reference's weights
    (within QUANT_KL_MARGIN of its mean KL), not against a fixed bar; the report says so."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="loratools-validate-"))
    try:
        return _validate(base, adapters, candidates, weights, prompts, tokens, device, tolerances, peft_check,
                         quant_baseline, work, quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _size(c: Candidate) -> int:
    return sum(f.stat().st_size for q in (c.path, c.adapter) if q is not None
               for f in ([q] if q.is_file() else [x for x in q.rglob("*") if x.is_file()]))


def _crashed(c: Candidate, provider: str, qtype, qb, tol: dict, reason: str) -> dict:
    """The report entry of a candidate its runtime could not evaluate (llama.cpp aborted)."""
    return {"candidate": c.spec, "kind": c.kind, "precision": c.precision, "runtime": provider,
            "size_bytes": _size(c), "quant_type": qtype, "quant_baseline": qb, "metrics": None, "per_prompt": [],
            "tolerance": tol, "passed": False, "failed_checks": ["runs"], "error": reason,
            "kl_over_adapter_effect": None, "exceeds_adapter_effect": False, "warnings": [], "worst_prompt": None}


def _validate(base, adapters, candidates, weights, prompts, tokens, device, tolerances, peft_check, quant_baseline,
              work: Path, quiet: bool = True) -> dict:
    from . import api
    from .models.decoder import load_model
    from .device import pick_device
    from .ops.common import progress, stage

    base = Path(base)
    dev = pick_device(device)
    cands = [parse_candidate(c) for c in candidates]
    if not cands:
        raise LoratoolsError("no candidate to validate")
    prompts = list(prompts or DEFAULT_PROMPTS)
    ids_list = [prompt_ids(base, p) for p in prompts]
    loaded = [api.load_adapter(a, base=base) for a in adapters]
    t0 = time.perf_counter()
    ref_model = load_model(base, adapters=loaded, weights=weights, device=str(dev))
    refs = [_torch_run(ref_model, ids, tokens, dev) for ids in progress(ids_list, "validate: reference", quiet=quiet, unit="prompt")]
    del ref_model
    effect = None
    if loaded:  # the yardstick: how far the adapters move the base model (base alone vs the reference)
        bare = load_model(base, device=str(dev))
        effect = _compare(refs, [_torch_run(bare, ids, tokens, dev) for ids in
                                 progress(ids_list, "validate: base without the adapters", quiet=quiet, unit="prompt")], tokens)[1]
        del bare
    report = {"schema": "loratools.validate/1", "base": str(base), "adapters": [str(a) for a in adapters],
              "weights": list(weights) if weights else None, "reference": {"runtime": "torch", "dtype": "fp32", "device": str(dev)},
              "prompts": len(prompts), "prompt_tokens": [len(i) for i in ids_list], "greedy_tokens": tokens,
              "reference_perplexity": perplexity([r[0] for r in refs], ids_list),
              "adapter_effect": effect, "candidates": []}
    baselines: dict[str, dict] = {}
    for ci, c in enumerate(cands, 1):
        tol = {**TOLERANCES[c.precision], **(tolerances or {})}
        qtype = _file_outtype(c.path) if c.kind == "gguf" and c.adapter is None else None
        qb = None
        if qtype is not None and quant_baseline:  # judged against what this type can do: llama.cpp's own file of it
            if qtype not in baselines:
                from .runtimes import llamacpp

                bpath = _quant_baseline(base, loaded, weights, qtype, work)
                try:
                    bouts = llamacpp.run_isolated(bpath, ids_list, tokens)
                except llamacpp.Crashed as e:
                    raise LoratoolsError(f"llama.cpp's own {qtype} file of the reference's weights: {e.reason}") from None
                _, bagg = _compare(refs, bouts, tokens, str(bpath))
                baselines[qtype] = {"outtype": qtype, "made_by": "llama.cpp llama_model_quantize from loratools' f32 "
                                    "export of the reference's weights (no importance matrix)",
                                    "size_bytes": bpath.stat().st_size, "mean_kl": bagg["mean_kl"],
                                    "p99_kl": bagg["p99_kl"], "top1": bagg["top1"],
                                    "perplexity": perplexity([o[0] for o in bouts], ids_list),
                                    "kl_margin": QUANT_KL_MARGIN, "top1_margin": QUANT_TOP1_MARGIN}
                bpath.unlink(missing_ok=True)
            qb = baselines[qtype]
            tol = {"mean_kl": qb["mean_kl"] * QUANT_KL_MARGIN + QUANT_KL_SLACK,
                   "top1": max(0.0, qb["top1"] - QUANT_TOP1_MARGIN), "greedy": 0.0, **(tolerances or {})}
        outs, provider = [], c.runtime
        todo = progress(ids_list, f"validate: candidate {ci}/{len(cands)} {c.spec.rstrip('/').split('/')[-1]}",
                        quiet=quiet, unit="prompt")
        if c.kind == "checkpoint":
            m = load_model(c.path, device=str(dev))
            outs = [_torch_run(m, ids, tokens, dev) for ids in todo]
            provider = f"torch ({dev})"
            del m
        elif c.kind == "gguf":
            from .runtimes import llamacpp

            gpu = dev.type == "cuda"
            provider = "llama.cpp (" + ("GPU offload" if gpu else "CPU") + ")"
            try:  # in a child process: a candidate that aborts llama.cpp fails, with the reason
                outs = llamacpp.run_isolated(c.path, ids_list, tokens, c.adapter, gpu=gpu, ticks=todo)
            except llamacpp.Crashed as e:
                report["candidates"].append(_crashed(c, provider, qtype, qb, tol, e.reason))
                continue
        else:
            from .runtimes.onnxruntime import Runner

            r = Runner(c.path, adapter=c.adapter, device="cuda" if dev.type == "cuda" else "cpu")
            outs = [(r.run(ids)[0], r.greedy(ids, tokens)) for ids in todo]
            provider = f"onnxruntime ({r.provider})"
        per, agg = _compare(refs, outs, tokens, c.spec)
        checks = {"mean_kl": agg["mean_kl"] <= tol["mean_kl"], "top1": agg["top1"] >= tol["top1"],
                  "greedy": agg["greedy_match"] >= tol["greedy"]}
        failed = [k for k, ok in checks.items() if not ok]
        size = _size(c)
        warn = []
        # a candidate whose error exceeds the adapters' whole effect has lost what they do (a warning: the
        # tolerances decide pass/fail)
        exceeds = effect is not None and agg["mean_kl"] > effect["mean_kl"]
        if exceeds:
            warn.append(f"its error (mean KL {agg['mean_kl']:.3g}, top-1 {100 * agg['top1']:.1f}%) exceeds the adapters' "
                        f"own effect (the base model without them: mean KL {effect['mean_kl']:.3g}, top-1 "
                        f"{100 * effect['top1']:.1f}%)")
        agg["perplexity"] = perplexity([o[0] for o in outs], ids_list)
        report["candidates"].append({"candidate": c.spec, "kind": c.kind, "precision": c.precision, "runtime": provider,
                                     "size_bytes": size, "quant_type": qtype, "quant_baseline": qb,
                                     "metrics": agg, "per_prompt": per, "tolerance": tol, "passed": not failed,
                                     "failed_checks": failed,
                                     "kl_over_adapter_effect": (agg["mean_kl"] / effect["mean_kl"]
                                                                if effect and effect["mean_kl"] > 0 else None),
                                     "exceeds_adapter_effect": exceeds, "warnings": warn,
                                     "worst_prompt": int(np.argmax([p["mean_kl"] for p in per]))})
    if peft_check and len(adapters) == 1 and not weights and (Path(adapters[0]) / "adapter_config.json").is_file():
        stage("validate: independent reference (transformers + PEFT)", quiet)
        ind = peft_reference(base, adapters[0], ids_list)
        if ind is not None:
            kl = float(np.mean([kl_rows(ind_l, r[0]).mean() for ind_l, r in zip(ind, refs)]))
            d = max(float(np.abs(ind_l - r[0]).max()) for ind_l, r in zip(ind, refs))
            report["independent_reference"] = {"runtime": "transformers + peft", "max_abs_vs_reference": d,
                                               "mean_kl_vs_reference": kl, "agrees": kl <= 1e-6}
    report["passed"] = all(c["passed"] for c in report["candidates"]) and \
        report.get("independent_reference", {}).get("agrees", True)
    report["seconds"] = time.perf_counter() - t0
    return report


def prompt_ids(base, prompt) -> list[int]:
    """A text prompt through the tokenizer (special tokens as it adds them), or chat messages
    rendered with the model's chat template (generation prompt appended) and encoded without
    added special tokens, as transformers' apply_chat_template does."""
    from . import api

    if isinstance(prompt, str):
        return api.tokenize(base, prompt)
    from .generate import _HFTokenizer

    tok = _HFTokenizer(Path(base))
    ids = tok.encode(tok.template().render(prompt, add_generation_prompt=True), special=False)
    if not ids:
        raise InputError("a chat prompt renders to no tokens")
    return ids


def read_prompts(path: str | os.PathLike) -> list:
    """A .txt file (one prompt per line) or .jsonl ({"prompt": ...} or {"text": ...} per line, or
    {"messages": [{role, content}, ...]}: a chat, rendered with the model's template)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such file", p)
    text = p.read_text(encoding="utf-8-sig")  # a byte-order mark is not a prompt
    # JSONL lines end at \n only (JSON strings may hold U+2028 unescaped); .txt lines as usual
    lines = [l.removesuffix("\r") for l in (text.split("\n") if p.suffix == ".jsonl" else text.splitlines()) if l.strip()]
    if p.suffix == ".jsonl":
        out = []
        for n, l in enumerate(lines, 1):
            try:
                rec = json.loads(l)
            except json.JSONDecodeError as e:
                raise InputError(f"line {n}: malformed JSON ({e.msg})", p) from e
            if isinstance(rec, dict) and "messages" in rec:
                from .generate import parse_chat

                try:
                    out.append(parse_chat(rec["messages"]))
                except InputError as e:
                    raise InputError(f"line {n}: {e.message.removeprefix('--chat: ')}", p) from None
                continue
            text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise InputError(f"line {n}: expected {{\"prompt\": ...}}, {{\"text\": ...}} or {{\"messages\": [...]}}", p)
            out.append(text)
        lines = out
    if not lines:
        raise InputError("no prompts in the file", p)
    return lines if p.suffix == ".jsonl" else [l.replace("\\n", "\n") for l in lines]  # JSON has its own escapes


def peft_reference(base: str | os.PathLike, adapter: str | os.PathLike, ids_list) -> list[np.ndarray] | None:
    """Logits of transformers + PEFT (an independent implementation), when both are installed."""
    try:
        import transformers  # noqa: F401
        from peft import PeftModel
    except ImportError:
        return None
    import warnings

    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()
        pm = PeftModel.from_pretrained(m, str(adapter)).eval()
    with torch.no_grad():
        return [pm(torch.tensor([ids])).logits[0].numpy() for ids in ids_list]


def _relative_error(wt: torch.Tensor, wb: torch.Tensor, m, rows: int = 1 << 22) -> float:
    """‖(W_t − W_b) − s·B A‖ / ‖W_t − W_b‖ in float64, a block of rows at a time (whole float64
    copies of a large embedding would take gigabytes)."""
    num, den = _squared_errors(wt, wb, m, rows)
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def _squared_errors(wt: torch.Tensor, wb: torch.Tensor, m, rows: int = 1 << 22) -> tuple[float, float]:
    """(‖(W_t − W_b) − s·B A‖², ‖W_t − W_b‖²) in float64, a block of rows at a time."""
    A, B = m.A.double(), m.B.double()
    step = max(1, rows // max(1, wt.shape[1]))
    num = den = 0.0
    for r in range(0, wt.shape[0], step):
        d = wt[r:r + step].double() - wb[r:r + step].double()
        approx = (A[:, r:r + step].T @ B.T if m.kind == "embedding" else B[r:r + step] @ A) * m.scale
        num += float((d - approx).pow(2).sum())
        den += float(d.pow(2).sum())
    return num, den


def validate_extraction(base: str | os.PathLike, tuned: str | os.PathLike, adapter: str | os.PathLike,
                        prompts: Sequence[str] | None = None, device: str = "auto", quiet: bool = True) -> dict:
    """How much of a full fine-tune an extracted adapter carries: per-module weight error and
    retained energy, per-layer hidden-state error on the prompts, and the logits' KL to the tuned
    model with the adapter against without it."""
    from . import api
    from .checkpoint import Checkpoint
    from .models.decoder import load_model
    from .device import pick_device

    dev = pick_device(device)
    a = api.load_adapter(adapter, base=base)
    modules = {}
    from .modelinfo import head_source, read_model_info, tied_pair

    from .ops.common import delta_sq, progress, retained_energy

    residual: dict[str, float] = {}  # stored tensor -> ‖ΔW − ΔŴ‖² where the adapter carries it
    with Checkpoint.open(base) as kb, Checkpoint.open(tuned) as kt:
        tied = tied_pair(read_model_info(base), kb.keys())
        for name, m in progress(sorted(a.modules.items()), "validate-extraction: module errors", quiet=quiet, unit="module"):
            key = f"{name}.weight"
            if key not in kt and key not in kb:
                key = head_source(key, tied)  # a tied head is the embedding (extract carries its change on lm_head)
            if key not in kt:
                raise InputError(f"tuned checkpoint lacks {key!r}", tuned)
            wt, wb = kt.get(key), kb.get(key)
            num, den = _squared_errors(wt, wb, m)
            err = math.sqrt(num) / max(math.sqrt(den), 1e-300)
            del wt, wb
            modules[name] = {"rel_error": err, "retained_energy": max(0.0, 1 - err * err), "rank": m.rank}
            if key not in residual or key == f"{name}.weight":
                # one stored tensor counts once: a tied embedding by its own module when it has one
                residual[key] = num
            bkey = f"{name}.bias"
            if m.bias is not None and bkey in kb and bkey in kt:
                d = kt.get(bkey).float() - kb.get(bkey).float()
                residual[bkey] = float((d.double() - m.bias.double() * m.scale).pow(2).sum())
        for key, t in a.modules_to_save.items():
            if key in kb and key in kt:
                residual[key] = float((kt.get(key).double() - t.double()).pow(2).sum())
        # the fine-tune's whole delta, as extract sums it (fp32 differences, in row blocks)
        total = unc = 0.0
        for key in progress(sorted(kb.keys()), "validate-extraction: the fine-tune's whole delta", quiet=quiet):
            if key not in kt or not kb.info(key).dtype.is_floating_point or kb.info(key).shape != kt.info(key).shape:
                continue
            d, e = delta_sq(kb.get_mapped(key), kt.get_mapped(key), "cpu")
            del d
            total += e
            unc += residual.get(key, e)
        whole = {"total_delta_energy": total, "retained_energy": retained_energy(unc, total)}
    prompts = list(prompts or DEFAULT_PROMPTS)
    ids_list = [prompt_ids(base, p) for p in prompts]

    def run(model, what):
        hidden = []
        hooks = [layer.register_forward_hook(lambda mod, i, o: hidden.append(o[0].detach())) for layer in model.model.layers]
        with torch.no_grad():
            out = [(model(torch.tensor([ids], device=dev))[0][0].cpu().numpy(), [h.cpu() for h in hidden[-len(model.model.layers):]])
                   for ids in progress(ids_list, f"validate-extraction: {what}", quiet=quiet, unit="prompt")]
        for h in hooks:
            h.remove()
        return out

    t = run(load_model(tuned, device=str(dev)), "tuned model")
    b = run(load_model(base, device=str(dev)), "base model")
    w = run(load_model(base, adapters=[a], device=str(dev)), "base + adapter")
    layers = []
    for li in range(len(t[0][1])):
        num = sum(float((tp[1][li] - wp[1][li]).norm()) for tp, wp in zip(t, w))
        num_b = sum(float((tp[1][li] - bp[1][li]).norm()) for tp, bp in zip(t, b))
        den = sum(float(tp[1][li].norm()) for tp in t)
        layers.append({"layer": li, "rel_error_with_adapter": num / den, "rel_error_base": num_b / den})
    kl_ad = float(np.mean([kl_rows(tp[0], wp[0]).mean() for tp, wp in zip(t, w)]))
    kl_base = float(np.mean([kl_rows(tp[0], bp[0]).mean() for tp, bp in zip(t, b)]))
    return {"schema": "loratools.validate-extraction/2", "base": str(base), "tuned": str(tuned), "adapter": str(adapter),
            **whole, "modules": modules, "layers": layers, "kl_tuned_vs_base_plus_adapter": kl_ad, "kl_tuned_vs_base": kl_base,
            "fraction_of_kl_removed": 1 - kl_ad / kl_base if kl_base > 0 else 1.0,
            "mean_module_retention": float(np.mean([m["retained_energy"] for m in modules.values()])) if modules else 0.0}
