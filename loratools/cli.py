"""The ``loratools`` command: parse options, call loratools.api, print reports. No logic here."""
from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import LoratoolsError, one_line


class _Api:
    """loratools.api, imported at a command's first call to it rather than with this module: the
    heavy imports (torch) then run inside main(), where Ctrl-C or SIGTERM ends them in one line."""

    def __getattr__(self, name):
        from . import api as module

        return getattr(module, name)


api = _Api()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _emit(data: dict, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human(data)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="loratools")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """loratools: LoRA adapters for LLMs — inspect, convert, extract, resize, combine, merge,
    export (GGUF, ONNX), validate, and train."""
    ctx.ensure_object(dict)["debug"] = debug


RUNTIMES = ["vllm", "sglang", "llama.cpp", "onnxruntime"]  # loratools.runtimes.profiles


class _LazyHelpOption(click.Option):
    """An option whose help is ``help.format(...)`` of values asked of the API when the help is
    shown (inside main()), not when the parser is built: building it then imports no torch."""

    def __init__(self, *args, help_values=None, **kw):
        super().__init__(*args, **kw)
        self._help_values = help_values

    def get_help_record(self, ctx):
        if self._help_values is not None and "{" in (self.help or ""):
            self.help = self.help.format(**self._help_values())
        return super().get_help_record(ctx)


# -- inspect -----------------------------------------------------------------------------------
def _print_adapter(d: dict) -> None:
    click.echo(f"{d['path']}: {d['format']} LoRA adapter, {d['num_modules']} modules, ranks {d['ranks']}, "
               f"{d['parameters']:,} parameters ({', '.join(d['dtypes']) or '-'}), {_human(d['size_bytes'])}")
    flags = [f for f, on in (("rsLoRA", d["use_rslora"]), ("DoRA", d["use_dora"])) if on]
    if flags:
        click.echo("  " + ", ".join(flags))
    if d["modules_to_save"]:
        click.echo("  modules_to_save: " + ", ".join(d["modules_to_save"]))
    ex = d.get("experts") or {}
    if ex:
        click.echo("  expert LoRA (ranks per group):")
        for blk, mats in ex["routed"].items():
            click.echo(f"    {blk}: " + "; ".join(f"{k} {g['experts']} experts, ranks {g['ranks']}" for k, g in mats.items()))
        for kind, key in (("router", "routers"), ("shared expert", "shared_expert")):
            for n, r in ex[key].items():
                click.echo(f"    {kind} {n}: rank {r}")
    click.echo(f"  {'module':<44} {'kind':<9} {'rank':>4} {'alpha':>8} {'scale':>9} {'shape (out x in)':>16}")
    for name, m in d["modules"].items():
        alpha = "-" if m["alpha"] is None else f"{m['alpha']:g}"
        extra = (" +bias" if m["bias"] else "") + (" +dora" if m["dora"] else "")
        click.echo(f"  {name:<44} {m['kind']:<9} {m['rank']:>4} {alpha:>8} {m['scale']:>9.4g} "
                   f"{m['out']:>7} x {m['in']:<7}{extra}")
    for rt, ws in d["warnings"].items():
        for w in ws:
            click.echo(f"  warning [{rt}]: {w}")


def _print_checkpoint(d: dict) -> None:
    arch = d.get("architecture", "?")
    click.echo(f"{d['path']}: {arch} checkpoint, {d['parameters']:,} parameters, {d['tensors']} tensors, "
               f"{_human(d['size_bytes'])} in {len(d['shards'])} shard(s)")
    if d.get("known_architecture") is False:
        click.echo(f"  layers {d['num_hidden_layers'] if d['num_hidden_layers'] is not None else '?'}, tied embeddings "
                   f"{d['tie_word_embeddings']} (loratools cannot run it: {d['not_runnable']}; tensor operations only)")
    if "layers" in d:
        click.echo(f"  layers {d['layers']}, hidden {d['hidden_size']}, intermediate {d['intermediate_size']}, "
                   f"heads {d['heads']} (kv {d['kv_heads']}, head_dim {d['head_dim']}), vocab {d['vocab_size']}, "
                   f"tied embeddings {d['tie_word_embeddings']}")
        rs = d["rope_scaling"]
        click.echo(f"  rope theta {d['rope_theta']:g}, type {rs.get('rope_type', 'default')}")
    click.echo("  dtypes: " + ", ".join(f"{k} ({v:,} params)" for k, v in d["dtypes"].items()))
    for s in d["shards"]:
        click.echo(f"  {s['file']}: {s['tensors']} tensors, {_human(s['bytes'])}")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--base", type=click.Path(), help="Base model: check the adapter fits it (and name kohya modules exactly).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.option("--allow-pickle", is_flag=True, help="Load pickle (.bin/.pt) files with torch.load(weights_only=True).")
@click.option("--plot", type=click.Path(), help="Adapters: write singular-value spectra and retained energy vs rank (.png, .svg, .pdf).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file.")
@click.option("--for", "for_runtime", type=click.Choice(RUNTIMES),
              help="List what this runtime would refuse or read differently; exit 1 if it would refuse the adapter.")
def inspect(path, base, as_json, allow_pickle, plot, overwrite, for_runtime):
    """Describe an adapter (modules, ranks, scales, runtime compatibility) or a checkpoint."""
    d = api.inspect(path, allow_pickle=allow_pickle, base=base, plot=plot, overwrite=overwrite, for_runtime=for_runtime)
    _emit(d, as_json, _print_adapter if d["type"] == "adapter" else _print_checkpoint)
    if plot and not as_json:
        click.echo(f"wrote plot to {plot}")
    sv = d.get("serving")
    if sv is not None:
        if not as_json:
            click.echo(f"{sv['runtime']} profile: {sv['profile']}")
            for i in sv["issues"]:
                click.echo(f"  {'REFUSES' if i['action'] == 'refuse' else 'differs'}: {i['message']} "
                           f"[convert --for {for_runtime}: {i['fix']}]")
            click.echo(f"  {sv['runtime']} would refuse this adapter" if sv["refused"] else
                       f"  {sv['runtime']} would load this adapter" + (" (reading it differently)" if sv["issues"] else ""))
        if sv["refused"]:
            raise SystemExit(1)


# -- module selection (extract, resize, convert) ------------------------------------------------
def select_options(f):
    """--include / --exclude, one rule for every command that has them (loratools.ops.common.selected)."""
    f = click.option("--exclude", multiple=True, metavar="REGEX",
                     help="Regex: skip modules whose name matches (repeatable: any match).")(f)
    return click.option("--include", multiple=True, metavar="REGEX",
                        help="Regex: only modules whose name matches (repeatable: any match).")(f)


def _dropped_line(dropped: list[str]) -> str:
    if not dropped:
        return "dropped no module (--include/--exclude matched every module)"
    shown = ", ".join(dropped[:6]) + (f", ... ({len(dropped) - 6} more)" if len(dropped) > 6 else "")
    return f"dropped {len(dropped)} module(s): {shown}"


# -- convert -----------------------------------------------------------------------------------
@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (peft) or .safetensors file (kohya); with --for: a PEFT folder (vllm, sglang), .gguf (llama.cpp) or .onnx_adapter (onnxruntime).")
@click.option("--to", "fmt", type=click.Choice(["peft", "kohya"]))
@click.option("--for", "for_runtime", type=click.Choice(RUNTIMES), help="Write an adapter this serving runtime accepts (instead of --to).")
@click.option("--max-rank", type=click.IntRange(1), help="With --for: the rank cap (default: the runtime's default; must be a rank it accepts).")
@click.option("--max-kl", type=float, help="With --for and --base: fail, writing nothing, when the mean KL(original || converted) is higher.")
@click.option("--prompts", type=click.Path(), help="With --for and --base: prompt file for the KL check (default: a few built-in prompts).")
@click.option("--base", type=click.Path(), help="Base model (checks shapes; resolves kohya names exactly; with --for: DoRA, modules_to_save, GGUF, the KL check).")
@click.option("--expert-form", type=click.Choice(["fused", "per-expert"]), help="PEFT expert LoRA: fused (target_parameters on transformers 5's fused experts; the default) or per-expert (transformers 4.x module names).")
@select_options
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True)
def convert(adapter, output, fmt, for_runtime, max_rank, max_kl, prompts, base, expert_form, include, exclude, overwrite, as_json):
    """Convert an adapter between PEFT and kohya formats (scales folded exactly), or between PEFT's two forms of expert LoRA;
    --include/--exclude keep or drop modules (and modules_to_save) by name. --for RUNTIME writes an adapter that
    vLLM, SGLang, llama.cpp or ONNX Runtime accepts, and reports what it cost."""
    if (fmt is None) == (for_runtime is None):
        raise click.UsageError("give exactly one of --to or --for")
    if for_runtime is not None:
        if expert_form or include or exclude:
            raise click.UsageError("--expert-form, --include and --exclude apply to --to, not --for")
        rep = api.convert_for_runtime(adapter, output, for_runtime, max_rank, base, max_kl, prompts, overwrite)
        _done(f"{rep['runtime']} adapter ({rep['output']}, ranks {rep['ranks']})", rep["out"], rep, as_json,
              _serving_summary(rep))
        return
    if max_rank is not None or max_kl is not None or prompts is not None:
        raise click.UsageError("--max-rank, --max-kl and --prompts apply to --for")
    rep = {"input": adapter, "format": fmt}
    out = api.convert_adapter(adapter, output, fmt, base=base, overwrite=overwrite, expert_form=expert_form,
                              include=include, exclude=exclude, report=rep)
    rep["out"] = str(out)
    _done(f"{fmt} adapter", out, rep, as_json, _dropped_line(rep["dropped"]) if include or exclude else "")


def _serving_summary(rep: dict) -> str:
    lines = [f"{rep['runtime']} profile: {rep['profile']}" + (f"; {rep['notes']}" if rep.get("notes") else "")]
    lines.append(f"  exact: {rep['scales_folded']} module scales folded into B, {rep['padded_modules']} modules padded "
                 f"with zeros to rank {max(rep['ranks'])}" + (f"; unchanged modules_to_save dropped: "
                                                            f"{', '.join(rep['dropped_unchanged'])}" if rep["dropped_unchanged"] else ""))
    names = {"rank_cap": "rank cap", "dora": "DoRA -> LoRA", "modules_to_save": "modules_to_save -> LoRA"}
    for step, d in rep["steps"].items():
        lines.append(f"  {names[step]}: retained energy {100 * d['retained']:.3f}% over {len(d['modules'])} modules"
                     + (", the 8 that lost most:" if len(d["modules"]) > 8 else ""))
        for n, m in sorted(d["modules"].items(), key=lambda kv: kv[1]["retained"])[:8]:
            lines.append(f"    {n:<44} rank {m['from_rank'] if m['from_rank'] is not None else '-':>4} -> {m['rank']:<4} "
                         f"retained {100 * m['retained']:.3f}%")
    if not rep["steps"]:
        lines.append("  no lossy step: the conversion is exact")
    c = rep.get("cost")
    if c:
        lines.append(f"  cost through the base model: mean KL(original || converted) {c['mean_kl']:.3e} (max {c['max_kl']:.3e}), "
                     f"top-1 agreement {100 * c['top1']:.1f}% over {c['positions']} positions of {c['prompts']} prompts")
    return "\n".join(lines)


# -- forward -----------------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path())
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(), help="Adapter to apply (repeatable).")
@click.option("--weights", help="Comma-separated weight per adapter.")
@click.option("-p", "--prompt", help="Text to run (tokenized with the model's tokenizer.json).")
@click.option("--ids", help="Comma-separated token ids instead of --prompt.")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def forward(model, adapters, weights, prompt, ids, top_k, device, as_json):
    """Run the reference model on a prompt, with and without adapters; show next-token predictions."""
    if (prompt is None) == (ids is None):
        raise click.UsageError("give exactly one of --prompt or --ids")
    try:
        toks = [int(t) for t in ids.split(",")] if ids is not None else api.tokenize(model, prompt)
        ws = _weights(weights, len(adapters)) if weights else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    d = api.forward_report(model, toks, adapters, ws, top_k, device)

    def human(d):
        click.echo(f"{len(toks)} tokens through {model}")
        click.echo("  base next-token top-k:    " + "  ".join(f"{t['token']!r} {t['logit']:.3f}" for t in d["base_top"]))
        if adapters:
            click.echo("  adapted next-token top-k: " + "  ".join(f"{t['token']!r} {t['logit']:.3f}" for t in d["adapted_top"]))
            click.echo(f"  adapters change logits by up to {d['max_abs_logit_change']:.4f}; top-1 differs at "
                       f"{d['top1_changed_positions']}/{len(toks)} positions")
    _emit(d, as_json, human)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(),
              help="Adapter to apply (repeatable for a checkpoint; one .gguf / .onnx_adapter for those models).")
@click.option("--weights", help="Comma-separated weight per adapter.")
@click.option("-p", "--prompt", help="Text to continue (tokenized with the model's tokenizer).")
@click.option("--chat", help="Chat messages: a JSON list of {role, content}, or a .json file holding one.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--greedy", "greedy", flag_value=True, default=True, help="Greedy decoding (the default).")
@click.option("--sample", "greedy", flag_value=False, help="Sample (reference decoder only), with --temperature/--top-p/--seed.")
@click.option("--temperature", type=float, help="Sampling temperature (implies --sample).")
@click.option("--top-p", type=float, help="Nucleus sampling mass (implies --sample).")
@click.option("--seed", type=int, help="Sampling seed (implies --sample; default 0).")
@click.option("--no-stop", is_flag=True, help="Run all --max-new-tokens even past the end-of-sequence token.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def generate(model, adapters, weights, prompt, chat, max_new_tokens, greedy, temperature, top_p, seed, no_stop,
             device, as_json):
    """Generate text from MODEL: a checkpoint folder (the reference decoder, adapters unmerged), a
    .gguf (llama.cpp) or an ONNX export folder (ONNX Runtime)."""
    if (prompt is None) == (chat is None):
        raise click.UsageError("give exactly one of --prompt or --chat")
    sampling = not greedy or any(v is not None for v in (temperature, top_p, seed))
    ws = _weights(weights, len(adapters)) if weights else None
    d = api.generate(model, adapters, ws, prompt, chat, max_new_tokens, not sampling,
                     1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p,
                     0 if seed is None else seed, device, not no_stop)

    def human(d):
        how = "greedy" if d["mode"] == "greedy" else f"sampled (T={d['temperature']}, top-p={d['top_p']}, seed={d['seed']})"
        click.echo(f"{d['runtime']}, {how}, {len(d['prompt_ids'])} prompt tokens -> {len(d['ids'])} new"
                   + (" (stopped at end of sequence)" if d["stopped_at_eos"] else ""), err=True)
        click.echo(d["text"])
    _emit(d, as_json, human)


# -- re-factorization ---------------------------------------------------------------------------
def rank_options(f):
    """The rank rules shared by extract and resize (exactly one of them, or --budget)."""
    opts = [
        click.option("--rank", type=int, help="Keep N components per module."),
        click.option("--energy", type=float, help="Smallest k with Σσ²(≤k)/Σσ² ≥ F."),
        click.option("--fro", type=float, help="kohya's rule: √energy ≥ F."),
        click.option("--ratio", type=float, help="Keep σ_i ≥ σ_1 / F."),
        click.option("--threshold", type=float, help="Keep σ_i ≥ T."),
        click.option("--budget", help="Total budget across modules: parameters (5M) or bytes (20MB); maximises retained energy."),
        click.option("--max-rank", type=int, help="Cap every module's rank."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _rule(rank, energy, fro, ratio, threshold, budget, max_rank, default_rank=16):
    given = [(k, v) for k, v in (("rank", rank), ("energy", energy), ("fro", fro), ("ratio", ratio),
                                 ("threshold", threshold)) if v is not None]
    if len(given) > 1 or (given and budget):
        raise click.UsageError("give at most one of --rank, --energy, --fro, --ratio, --threshold, --budget")
    if not given and not budget and default_rank is None:
        if max_rank is None:  # no silent default: say what to choose
            raise LoratoolsError("resize needs a rank rule: --rank N, --energy F, --fro F, --ratio F, --threshold T, "
                                 "--budget SIZE or --max-rank N (to drop modules only, use convert --include/--exclude)")
        default_rank = max_rank  # --max-rank alone: cap every module at N
    kind, value = given[0] if given else ("rank", 16 if default_rank is None else default_rank)  # (a budget ignores it)
    return api.RankRule(kind, value, max_rank)


def _done(what: str, path, report: dict | None, as_json: bool, summary: str = "") -> None:
    if as_json:
        click.echo(json.dumps(report or {}, indent=2, default=str))
    else:
        if summary:
            click.echo(summary)
        click.echo(f"wrote {what} to {path}")


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="Base checkpoint folder.")
@click.option("--tuned", required=True, type=click.Path(), help="Fully fine-tuned checkpoint folder.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output PEFT adapter folder.")
@rank_options
@click.option("--exact", is_flag=True, help="Full SVD instead of the seeded randomized SVD.")
@select_options
@click.option("--embeddings", type=click.Choice(["lora", "full", "skip"]), default="lora", show_default=True,
              help="embed_tokens/lm_head deltas: embedding LoRA, full modules_to_save, or skip (with a warning).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--oversample", type=click.IntRange(0), default=16, show_default=True, help="Randomized SVD: extra sketch columns.")
@click.option("--power-iters", type=click.IntRange(0), default=4, show_default=True, help="Randomized SVD: power iterations.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the per-module report as JSON.")
@click.option("--quiet", is_flag=True)
@click.option("--plot", type=click.Path(), help="Write each module's delta spectrum and retained energy vs rank (.png, .svg, .pdf).")
@click.option("--expert-form", type=click.Choice(["fused", "per-expert"]), help="PEFT expert LoRA: fused (target_parameters on transformers 5's fused experts; the default) or per-expert (transformers 4.x module names).")
def extract(base, tuned, output, rank, energy, fro, ratio, threshold, budget, max_rank, exact, include, exclude,
            embeddings, device, seed, oversample, power_iters, dtype, overwrite, as_json, quiet, plot, expert_form):
    """Extract a LoRA from a full fine-tune (ΔW = tuned − base, factored per module)."""
    rule = _rule(rank, energy, fro, ratio, threshold, budget, max_rank)
    _, rep = api.extract(base, tuned, output, rule, budget=budget, exact=exact, include=include, exclude=exclude,
                         embeddings=embeddings, device=device, seed=seed, oversample=oversample,
                         power_iters=power_iters, dtype=dtype, overwrite=overwrite, quiet=quiet or as_json, plot=plot,
                         expert_form=expert_form)
    if not as_json:
        for w in rep["warnings"]:
            click.echo(f"warning: {w}", err=True)
    ranks = sorted(set(rep["ranks"].values()))
    _done("PEFT adapter", output, rep, as_json,
          f"{len(rep['ranks'])} modules, ranks {ranks[0]}..{ranks[-1]}, {rep['parameters']:,} parameters"
          + (f" (budget {rep['budget_params']:,})" if rep.get("budget_params") is not None else "") + ", "
          f"retained energy {100 * rep['retained_energy']:.2f}% in {rep['seconds']:.1f} s (report: {output}/{api.EXTRACT_REPORT})"
          if ranks else "")


@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path())
@rank_options
@click.option("--base", type=click.Path(), help="Base model (checks shapes; exact kohya names).")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), help="Output format (default: the input's).")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), default="keep", show_default=True)
@click.option("--expert-form", type=click.Choice(["fused", "per-expert"]), help="PEFT expert LoRA: fused (target_parameters on transformers 5's fused experts; the default) or per-expert (transformers 4.x module names).")
@select_options
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def resize(adapter, output, rank, energy, fro, ratio, threshold, budget, max_rank, base, fmt, dtype, expert_form,
           include, exclude, overwrite, as_json):
    """Shrink an adapter's ranks optimally (QR + small SVD; no dense matrix); --include/--exclude keep or drop
    modules (and modules_to_save) by name."""
    rule = _rule(rank, energy, fro, ratio, threshold, budget, max_rank, default_rank=None)
    res, rep = api.resize(adapter, output, rule, budget=budget, base=base, fmt=fmt, dtype=dtype, overwrite=overwrite,
                          expert_form=expert_form, include=include, exclude=exclude)
    before, after = rep["parameters_before"], rep["parameters_after"]
    lines = [_dropped_line(rep["dropped"])] if include or exclude else []
    lines.append(f"{len(res.modules)} modules, {before:,} -> {after:,} parameters"
                 + (f" (budget {rep['budget_params']:,})" if rep.get("budget_params") is not None else "")
                 + f", retained vs input adapter {100 * rep['retained_vs_input']:.2f}% (lowest module "
                 f"{100 * min((m['energy'] for m in rep['modules'].values()), default=1):.2f}%)")
    _done(f"{rep.pop('format')} adapter", output, rep, as_json, "\n".join(lines))


def _weights(weights: str | None, n: int):
    if weights is None:
        return None
    try:
        ws = [float(w) for w in weights.split(",")]
    except ValueError as e:
        raise click.BadParameter(f"--weights must be comma-separated numbers: {e}") from e
    if len(ws) != n:
        raise click.BadParameter(f"--weights has {len(ws)} values for {n} adapter(s)")
    for w in ws:
        _finite(w, "--weights")
    return ws


def _finite(v: float, what: str) -> float:
    import math

    if v is not None and not math.isfinite(v):
        raise click.BadParameter(f"{what} must be finite, got {v}")
    return v


@cli.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each).")
@click.option("--method", type=click.Choice(["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
              default="linear", show_default=True)
@click.option("--rank", type=int, help="Output rank for svd / ties / dare / magnitude_prune (default: the largest input rank).")
@click.option("--density", type=float, default=1.0, show_default=True, help="ties / dare / magnitude_prune: fraction kept.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--base", type=click.Path(), help="Base model (checks every adapter fits it).")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), default="peft", show_default=True)
@click.option("--expert-form", type=click.Choice(["fused", "per-expert"]), help="PEFT expert LoRA: fused (target_parameters on transformers 5's fused experts; the default) or per-expert (transformers 4.x module names).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def combine(adapters, output, weights, method, rank, density, seed, base, fmt, expert_form, overwrite, as_json):
    """Combine adapters: exact linear/cat, optimal svd, or ties / dare / magnitude_prune."""
    res, rep, warned = api.combine(adapters, output, _weights(weights, len(adapters)), method, rank, density, seed,
                                   base, fmt, overwrite, expert_form)
    for w in warned:
        click.echo(f"warning: {w}", err=True)
    _done(f"{fmt} adapter", output, rep, as_json, f"combined {len(adapters)} adapters ({method}): {len(res.modules)} modules, "
          f"ranks {sorted(set(res.ranks.values()))}")


@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("--factor", "factor_", type=float, required=True, callback=lambda c, p, v: _finite(v, "--factor"),
              help="Multiply the adapter's ΔW by this.")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def scale(adapter, factor_, output, overwrite, as_json):
    """Scale an adapter's effect: ΔW' = factor · ΔW."""
    _, rep = api.scale(adapter, factor_, output, overwrite)
    fmt = rep.pop("format")
    _done(f"{fmt} adapter", output, rep, as_json)


@cli.command()
@click.argument("adapter", type=click.Path())
@click.argument("other", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def subtract(adapter, other, output, overwrite, as_json):
    """ADAPTER − OTHER, exactly (stacked factors)."""
    _, rep = api.subtract(adapter, other, output, overwrite)
    _done("peft adapter", output, rep, as_json)


def _merge_cmd(unmerge: bool):
    @click.option("--base", required=True, type=click.Path(), help="Base checkpoint folder.")
    @click.option("-a", "--adapter", "adapters", multiple=True, required=True, type=click.Path(), help="Adapter (repeatable).")
    @click.option("--weights", help="Comma-separated weight per adapter.")
    @click.option("-o", "--output", required=True, type=click.Path(), help="Output checkpoint folder.")
    @click.option("--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), default="keep", show_default=True)
    @click.option("--max-shard-size", default="2GB", show_default=True)
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
    @click.option("--overwrite", is_flag=True)
    @click.option("--quiet", is_flag=True)
    @click.option("--json", "as_json", is_flag=True)
    def cmd(base, adapters, weights, output, dtype, max_shard_size, device, overwrite, quiet, as_json):
        rep = api.merge(base, adapters, output, _weights(weights, len(adapters)), dtype, max_shard_size, device,
                        overwrite, quiet=quiet or as_json, unmerge=unmerge)
        msg = f"{'unmerged' if unmerge else 'merged'} {len(adapters)} adapter(s) into {len(rep['modified'])} tensors"
        if "experts_changed" in rep:
            msg += f" ({rep['experts_changed']} experts changed)"
        if "dequantized" in rep:
            msg += f"; MXFP4 experts written as {rep['dequantized']['to']}, quantization_config dropped from config.json"
        if "tied_embeddings" in rep:
            msg += ("; tied embeddings untied (the merged embedding and head differ): lm_head.weight written, "
                    "tie_word_embeddings false" if rep.get("untied_embeddings") else
                    "; tied embeddings kept (the merged embedding and head are equal): tie_word_embeddings true")
        _done("checkpoint", output, rep, as_json, msg)
    cmd.__doc__ = ("Subtract adapters from merged weights: W = W' − s·B·A (fp32, rounded once)." if unmerge else
                   "Merge adapters into base weights: W' = W + s·B·A in fp32, rounded once; streamed.")
    return cmd


cli.command("merge")(_merge_cmd(False))
cli.command("unmerge")(_merge_cmd(True))


# -- export / import --------------------------------------------------------------------------
@cli.group()
def export():
    """Write models and adapters for other runtimes (llama.cpp GGUF, ONNX Runtime)."""


@export.command("gguf")
@click.argument("model", type=click.Path())
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(), help="Adapter merged first (repeatable).")
@click.option("--weights", help="Comma-separated weight per adapter.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .gguf file.")
@click.option("--outtype", cls=_LazyHelpOption, default="f16", show_default=True, metavar="TYPE",
              help_values=lambda: {"types": ", ".join(api.gguf_outtypes())},
              help="One of {types}. f32/f16/bf16/q8_0 are written directly; the K-quants, "
                   "i-quants (and q4_0..q5_1 when llama-cpp-python is installed) by llama.cpp's own quantizer from an "
                   "f32 intermediate.")
@click.option("--imatrix", type=click.Path(), help="Importance matrix for the quantizer (llama-imatrix's GGUF or .dat file).")
@click.option("--calibration", type=click.Path(),
              help="Text or JSONL (as train reads it) to compute the importance matrix from (reference decoder, fp32).")
@click.option("--save-imatrix", type=click.Path(), help="Write the importance matrix computed from --calibration (GGUF format).")
@click.option("--pre", help="Override the detected tokenizer.ggml.pre name (e.g. llama-bpe, qwen2, smollm).")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def export_gguf(model, adapters, weights, output, outtype, imatrix, calibration, save_imatrix, pre, overwrite, quiet,
                as_json):
    """A llama.cpp GGUF model (every family of the architecture registry), adapters merged, tensors streamed."""
    rep, warned = api.export_gguf(model, adapters, output, _weights(weights, len(adapters)), outtype, pre, overwrite,
                                  quiet or as_json, imatrix=imatrix, calibration=calibration, save_imatrix=save_imatrix)
    if not as_json:
        for w in warned:
            click.echo(f"warning: {w}", err=True)
    _done(f"GGUF model ({rep['arch']}, {outtype}, tokenizer pre {rep['tokenizer'].get('pre')})", output, rep, as_json)


@export.command("gguf-adapter")
@click.argument("adapter", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The base model folder the adapter belongs to.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .gguf file.")
@click.option("--outtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def export_gguf_adapter(adapter, base, output, outtype, overwrite, as_json):
    """A llama.cpp LoRA adapter; rank/alpha patterns and rsLoRA folded into B exactly."""
    rep = api.export_gguf_adapter(adapter, base, output, outtype, overwrite)
    _done(f"GGUF adapter (alpha {rep['alpha']:g}, {rep['scales_folded']} module scales folded into B)", output, rep, as_json)


@export.command("onnx")
@click.argument("model", type=click.Path())
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(), help="Adapter merged first (repeatable).")
@click.option("--weights", help="Comma-separated weight per adapter.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (model.onnx + config + tokenizer).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--no-cache", is_flag=True, help="No past_key_values inputs / present outputs.")
@click.option("--lora-slots", "slots", is_flag=False, flag_value="all-linear",
              help="all-linear (the default when no value is given) or q_proj,v_proj,...: LoRA inputs for ONNX Runtime adapters.")
@click.option("--opset", type=click.IntRange(17), default=17, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def export_onnx(model, adapters, weights, output, dtype, no_cache, slots, opset, overwrite, quiet, as_json):
    """An ONNX model with KV cache (Optimum / onnxruntime-genai IO names), adapters merged."""
    rep = api.export_onnx(model, adapters, output, _weights(weights, len(adapters)), dtype, not no_cache, slots, opset,
                          overwrite, quiet=quiet or as_json)
    what = f"ONNX model ({dtype}, {'KV cache' if not no_cache else 'no cache'}" + (f", {len(rep['lora_slots'])} LoRA slots" if slots else "") + ")"
    _done(what, output, rep, as_json)


@export.command("onnx-adapter")
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .onnx_adapter file.")
@click.option("--base", type=click.Path(), help="Base model folder (checks the adapter fits).")
@click.option("--model", "slot_model", type=click.Path(), help="An ONNX slot model: check every parameter has its slot.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def export_onnx_adapter(adapter, output, base, slot_model, dtype, overwrite, as_json):
    """ONNX Runtime's adapter format, per-module scales folded into B."""
    rep = api.export_onnx_adapter(adapter, output, base, slot_model, dtype, overwrite)
    _done(f"ONNX Runtime adapter ({rep['modules']} modules, {dtype})", output, rep, as_json)


@cli.group("import")
def import_():
    """Read models from other formats into Hugging Face checkpoints."""


@import_.command("gguf")
@click.argument("path", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output checkpoint folder.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="auto: the GGUF's own float type, fp32 for quantized files.")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def import_gguf(path, output, dtype, overwrite, quiet, as_json):
    """GGUF → HF checkpoint: dequantize, undo the Q/K permutation, rebuild config and tokenizer."""
    rep = api.import_gguf(path, output, dtype, overwrite, quiet or as_json)
    _done(f"{rep['arch']} checkpoint ({rep['dtype']}, from {', '.join(rep['quant_types'])})", output, rep, as_json)


# -- train ------------------------------------------------------------------------------------
@cli.command()
@click.option("--model", required=True, type=click.Path(), help="Base model folder.")
@click.option("--data", "data_path", required=True, type=click.Path(), help=".txt or .jsonl (text | prompt/completion | messages).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output PEFT adapter folder.")
@click.option("--rank", type=click.IntRange(1), default=16, show_default=True)
@click.option("--alpha", type=float, default=32.0, show_default=True)
@click.option("--rslora", is_flag=True, help="Scale alpha/sqrt(r) instead of alpha/r.")
@click.option("--targets", default="all-linear", show_default=True, help="all-linear | attention | mlp | q_proj,v_proj,...")
@click.option("--lr", type=float, help="Peak learning rate (default: about 10x a full fine-tuning LR for the model's size).")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(2), default=512, show_default=True, help="Packed sequence length; longer examples are truncated.")
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True, help="Warmup steps before the cosine decay.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--eval", "eval_path", type=click.Path(), help="Held-out data, same formats.")
@click.option("--eval-every", type=click.IntRange(1), default=50, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=100, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="Base weights' dtype (LoRA stays fp32).")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUTPUT.train/.")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def train(model, data_path, output, eval_path, resume, overwrite, quiet, as_json, **opts):
    """Train a LoRA adapter on your data (PEFT output)."""
    rep = api.train(model, data_path, output, eval_path, resume, overwrite, quiet or as_json,
                    log=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)), **opts)
    last = rep["eval_losses"][-1][1] if rep["eval_losses"] else None
    _done("PEFT adapter", output, rep, as_json,
          f"{rep['steps']} steps, final train loss {rep['losses'][-1]:.4f}"
          + (f", eval loss {last:.4f}" if last is not None else "") + f", {rep.get('tokens_per_s', 0):.0f} tokens/s")


# -- validate ---------------------------------------------------------------------------------
@cli.command()
@click.argument("candidates", nargs=-1, required=True)
@click.option("--base", required=True, type=click.Path(), help="Base model folder (the reference runs it in fp32).")
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(), help="Adapter applied unmerged (repeatable).")
@click.option("--weights", help="Comma-separated weight per adapter.")
@click.option("--prompts", type=click.Path(), help="Prompt file: .txt (one per line) or .jsonl ({\"prompt\": ...} or {\"messages\": [...]}, a chat in the model's template).")
@click.option("--tokens", type=click.IntRange(0), default=16, show_default=True, help="Greedy continuation length.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-kl", type=float, help="Override the mean-KL tolerance for every candidate.")
@click.option("--min-top1", type=float, help="Override the top-1 agreement tolerance.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--no-quant-baseline", is_flag=True,
              help="Judge a quantized GGUF by the fixed per-precision bar instead of llama.cpp's own file of its type.")
@click.option("--json", "as_json", is_flag=True)
def validate(candidates, base, adapters, weights, prompts, tokens, device, max_kl, min_top1, no_quant_baseline, quiet, as_json):
    """Check that written artifacts compute what base + adapters compute, each in its own runtime.

    CANDIDATES: a checkpoint folder, a .gguf, BASE.gguf+ADAPTER.gguf, an ONNX folder, or
    ONNX_DIR+NAME.onnx_adapter. Exit code 0 only when every candidate passes."""
    tol = {k: x for k, x in (("mean_kl", max_kl), ("top1", min_top1)) if x is not None}
    rep = api.validate(base, adapters, candidates, _weights(weights, len(adapters)),
                       api.read_prompts(prompts) if prompts else None, tokens, device, tol, quiet=quiet or as_json,
                       quant_baseline=not no_quant_baseline)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        ref = rep["reference"]
        click.echo(f"reference: {base} + {len(adapters)} adapter(s), torch fp32 on {ref['device']}; "
                   f"{rep['prompts']} prompts, {tokens} greedy tokens")
        rw = max([len("runtime"), len("torch")] + [len(c["runtime"]) for c in rep["candidates"]])  # never cut
        click.echo(f"  {'candidate':<40} {'size':>8} {'runtime':<{rw}} {'prec':<5} {'max|Δ|':>8} {'mean KL':>9} {'top-1':>6} {'greedy':>7}  result")
        eff = rep.get("adapter_effect")
        if eff:  # the yardstick: the base model without the adapters, against the same reference
            click.echo(f"  {'(base without the adapters)':<40} {'':>8} {'torch':<{rw}} {'fp32':<5} "
                       f"{eff['max_abs']:>8.3g} {eff['mean_kl']:>9.2e} {100 * eff['top1']:>5.1f}% "
                       f"{100 * eff['greedy_match']:>6.1f}%  the adapters' effect")
        for c in rep["candidates"]:
            m = c["metrics"]
            name = " + ".join(p.rstrip("/").split("/")[-1] for p in c["candidate"].split("+"))
            if m is None:  # the runtime could not evaluate it (llama.cpp aborted in its child process)
                click.echo(f"  {name[-40:]:<40} {_human(c['size_bytes']):>8} {c['runtime']:<{rw}} {c['precision']:<5} "
                           f"{'-':>8} {'-':>9} {'-':>6} {'-':>7}  FAIL ({c['error']})")
                continue
            res = "pass" if c["passed"] else "FAIL (" + ", ".join(c["failed_checks"]) + f"; worst prompt {c['worst_prompt']})"
            if c.get("exceeds_adapter_effect"):
                r = c["kl_over_adapter_effect"]
                res += "; WARNING: error > the adapters' effect" + (f" ({r:.2g}x)" if r is not None else "")
            click.echo(f"  {name[-40:]:<40} {_human(c['size_bytes']):>8} {c['runtime']:<{rw}} {c['precision']:<5} "
                       f"{m['max_abs']:>8.3g} {m['mean_kl']:>9.2e} {100 * m['top1']:>5.1f}% {100 * m['greedy_match']:>6.1f}%  {res}")
        for c in rep["candidates"]:
            m, qb = c["metrics"], c.get("quant_baseline")
            if m is None:
                continue
            if c.get("quant_type"):
                click.echo(f"  {c['quant_type']} quality of {c['candidate'].rstrip('/').split('/')[-1]}: KL mean "
                           f"{m['mean_kl']:.4f}, p99 {m['p99_kl']:.4f}; top-1 {100 * m['top1']:.1f}%; perplexity "
                           f"{m['perplexity']:.3f} (reference {rep['reference_perplexity']:.3f})")
            if qb:
                click.echo(f"    judged against llama.cpp's own {qb['outtype']} of the same weights (from the f32 export, "
                           f"no imatrix): KL mean {qb['mean_kl']:.4f}, p99 {qb['p99_kl']:.4f}; top-1 "
                           f"{100 * qb['top1']:.1f}%; perplexity {qb['perplexity']:.3f}; pass when KL <= "
                           f"{c['tolerance']['mean_kl']:.4f} and top-1 >= {100 * c['tolerance']['top1']:.1f}%")
        for c in rep["candidates"]:
            for w in c.get("warnings", []):
                click.echo(f"warning: {c['candidate']}: {w}", err=True)
        ind = rep.get("independent_reference")
        if ind:
            click.echo(f"  independent reference (transformers + PEFT) vs loratools' reference: max |Δ| {ind['max_abs_vs_reference']:.3g}, "
                       f"mean KL {ind['mean_kl_vs_reference']:.2e}: {'agrees' if ind['agrees'] else 'DISAGREES'}")
        click.echo("all candidates passed" if rep["passed"] else "validation FAILED")
    if not rep["passed"]:
        raise SystemExit(1)


@cli.command("validate-extraction")
@click.option("--base", required=True, type=click.Path())
@click.option("--tuned", required=True, type=click.Path())
@click.option("-a", "--adapter", required=True, type=click.Path())
@click.option("--prompts", type=click.Path())
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True)
def validate_extraction(base, tuned, adapter, prompts, device, quiet, as_json):
    """How much of a full fine-tune an extracted adapter carries (weights, activations, logits)."""
    rep = api.validate_extraction(base, tuned, adapter, api.read_prompts(prompts) if prompts else None, device,
                                  quiet=quiet or as_json)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    worst = max(rep["modules"].items(), key=lambda kv: kv[1]["rel_error"])
    click.echo(f"{len(rep['modules'])} modules: retained energy {100 * rep['retained_energy']:.2f}% "
               f"(mean per-module retention {100 * rep['mean_module_retention']:.2f}%), "
               f"worst relative error {worst[1]['rel_error']:.4f} ({worst[0]})")
    for l in rep["layers"]:
        click.echo(f"  layer {l['layer']:>3}: hidden-state error {l['rel_error_with_adapter']:.4f} with the adapter, "
                   f"{l['rel_error_base']:.4f} without")
    click.echo(f"KL(tuned ‖ base + adapter) = {rep['kl_tuned_vs_base_plus_adapter']:.3e} vs KL(tuned ‖ base) = "
               f"{rep['kl_tuned_vs_base']:.3e}: the adapter removes {100 * rep['fraction_of_kl_removed']:.1f}% of the divergence")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script: eval "$(loratools completion bash)" in ~/.bashrc."""
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(cli, {}, "loratools", "_LORATOOLS_COMPLETE")
    click.echo(comp.source())


def _tune_allocator(training: bool = False) -> None:
    """Fix glibc's mmap threshold. Streaming commands allocate and free one tensor after another;
    with the default dynamic threshold, freed blocks of up to 32 MB stay in the heap and the
    process's memory creeps up across tensors, so they hand every block over 1 MiB back to the OS.
    Training reuses the same activation sizes every step, where mapping and zeroing fresh pages
    each time costs a third of the speed: it keeps blocks under 8 MiB in the heap."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, (8 if training else 1) << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def _signal_name(e: KeyboardInterrupt) -> str:
    import signal

    signum = getattr(e, "signum", None)
    return "" if signum in (None, signal.SIGINT) else signal.Signals(signum).name


def _exit_code(e: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended (130 for Ctrl-C)."""
    import signal

    return 128 + (getattr(e, "signum", None) or signal.SIGINT)


def _interrupted(e: KeyboardInterrupt, argv: list[str]) -> str:
    """The one line for an interrupt (Ctrl-C, SIGTERM, SIGHUP); for ``train``, where it stopped
    and the command that resumes it."""
    from .errors import TrainInterrupted

    by = _signal_name(e)
    if not isinstance(e, TrainInterrupted):
        return f"terminated by {by}" if by else "interrupted"
    import shlex

    where = f"train {'stopped by ' + by if by else 'interrupted'} at step {e.step}/{e.total}"
    if e.checkpoint_step is None:
        return f"{where}, before its first checkpoint: nothing to resume; run the command again to start over"
    again = argv + ([] if "--resume" in argv else ["--resume"])
    return (f"{where}; the checkpoint of step {e.checkpoint_step} is in {e.out}.train/checkpoints: continue exactly "
            f"with: loratools {shlex.join(again)}")


_TERM_SIGNALS = ("SIGTERM", "SIGHUP")


def _raise_terminated(signum, frame):
    import signal

    from .errors import Terminated

    for name in _TERM_SIGNALS:  # one is enough: a second would cut the cleanup short (SIGKILL still ends it)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


def _handle_signals() -> dict:
    """SIGTERM and SIGHUP raise errors.Terminated (a KeyboardInterrupt) in the main thread, as
    SIGINT raises KeyboardInterrupt: temporary files are removed and writer threads joined on the
    way out. Returns the handlers it replaced (none off the main thread, where Python cannot)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}
    for name in _TERM_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
            old[sig] = signal.signal(sig, _raise_terminated)
    return old


def main(argv=None) -> int:
    import signal

    old = _handle_signals()
    try:
        return _main(argv)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _tune_allocator(training="train" in argv[:3])
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="loratools", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort as e:  # click turns a KeyboardInterrupt into Abort
        cause = e.__cause__
        if isinstance(cause, KeyboardInterrupt):
            click.echo(f"loratools: {_interrupted(cause, argv)}", err=True)
            return _exit_code(cause)
        click.echo("loratools: aborted", err=True)
        return 130
    except LoratoolsError as e:
        if debug:
            raise
        click.echo(f"loratools: error: {one_line(e)}", err=True)
        return e.exit_code
    except KeyboardInterrupt as e:
        click.echo(f"loratools: {_interrupted(e, argv)}", err=True)
        return _exit_code(e)
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        click.echo(f"loratools: error: {where}{one_line(e.strerror or e)}", err=True)
        return 5
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            raise
        click.echo(f"loratools: internal error: {type(e).__name__}: {one_line(e)} (run with --debug for the traceback)", err=True)
        return 70


def entry() -> None:
    sys.exit(main())
