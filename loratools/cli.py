"""The ``loratools`` command: parse options, call loratools.api, print reports. No logic here."""
from __future__ import annotations

import json
import sys

import click

from . import __version__, api
from .errors import LoratoolsError, one_line


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
    """loratools: LoRA adapters for LLMs — inspect, convert, run, and (soon) extract, resize,
    combine, merge, export and validate."""
    ctx.ensure_object(dict)["debug"] = debug


# -- inspect -----------------------------------------------------------------------------------
def _print_adapter(d: dict) -> None:
    click.echo(f"{d['path']}: {d['format']} LoRA adapter, {d['num_modules']} modules, ranks {d['ranks']}, "
               f"{d['parameters']:,} parameters ({', '.join(d['dtypes']) or '-'}), {_human(d['size_bytes'])}")
    flags = [f for f, on in (("rsLoRA", d["use_rslora"]), ("DoRA", d["use_dora"])) if on]
    if flags:
        click.echo("  " + ", ".join(flags))
    if d["modules_to_save"]:
        click.echo("  modules_to_save: " + ", ".join(d["modules_to_save"]))
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
def inspect(path, base, as_json, allow_pickle):
    """Describe an adapter (modules, ranks, scales, runtime compatibility) or a checkpoint."""
    d = api.inspect(path, allow_pickle=allow_pickle, base=base)
    _emit(d, as_json, _print_adapter if d["type"] == "adapter" else _print_checkpoint)


# -- convert -----------------------------------------------------------------------------------
@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (peft) or .safetensors file (kohya).")
@click.option("--to", "fmt", type=click.Choice(["peft", "kohya"]), required=True)
@click.option("--base", type=click.Path(), help="Base model (checks shapes; resolves kohya names exactly).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def convert(adapter, output, fmt, base, overwrite):
    """Convert an adapter between PEFT and kohya formats (scales folded exactly)."""
    out = api.convert_adapter(adapter, output, fmt, base=base, overwrite=overwrite)
    click.echo(f"wrote {fmt} adapter to {out}")


# -- forward -----------------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path())
@click.option("-a", "--adapter", "adapters", multiple=True, type=click.Path(), help="Adapter to apply (repeatable).")
@click.option("--weights", help="Comma-separated weight per adapter.")
@click.option("-p", "--prompt", help="Text to run (tokenized with the model's tokenizer.json).")
@click.option("--ids", help="Comma-separated token ids instead of --prompt.")
@click.option("--top-k", default=5, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def forward(model, adapters, weights, prompt, ids, top_k, device, as_json):
    """Run the reference model on a prompt, with and without adapters; show next-token predictions."""
    import torch

    if (prompt is None) == (ids is None):
        raise click.UsageError("give exactly one of --prompt or --ids")
    try:
        toks = [int(t) for t in ids.split(",")] if ids else api.tokenize(model, prompt)
        ws = [float(w) for w in weights.split(",")] if weights else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    base = api.forward(model, toks, device=device)
    d = {"model": model, "tokens": toks, "device": device}
    d["base_top"] = _top(base[-1], top_k, model)
    if adapters:
        adapted = api.forward(model, toks, adapters, ws, device=device)
        d["adapters"] = list(adapters)
        d["adapted_top"] = _top(adapted[-1], top_k, model)
        d["max_abs_logit_change"] = float((adapted - base).abs().max())
        d["top1_changed_positions"] = int((adapted.argmax(-1) != base.argmax(-1)).sum())

    def human(d):
        click.echo(f"{len(toks)} tokens through {model}")
        click.echo("  base next-token top-k:    " + "  ".join(f"{t['token']!r} {t['logit']:.3f}" for t in d["base_top"]))
        if adapters:
            click.echo("  adapted next-token top-k: " + "  ".join(f"{t['token']!r} {t['logit']:.3f}" for t in d["adapted_top"]))
            click.echo(f"  adapters change logits by up to {d['max_abs_logit_change']:.4f}; top-1 differs at "
                       f"{d['top1_changed_positions']}/{len(toks)} positions")
    _emit(d, as_json, human)
    del torch


def _top(logits, k, model) -> list[dict]:
    vals, idx = logits.topk(min(k, logits.numel()))
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(f"{model}/tokenizer.json")
        dec = lambda i: tok.decode([i])  # noqa: E731
    except Exception:  # noqa: BLE001 - decoding is cosmetic
        dec = str
    return [{"id": int(i), "token": dec(int(i)), "logit": float(v)} for v, i in zip(vals, idx)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="loratools", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("loratools: aborted", err=True)
        return 130
    except LoratoolsError as e:
        if debug:
            raise
        click.echo(f"loratools: error: {one_line(e)}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("loratools: interrupted", err=True)
        return 130
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
