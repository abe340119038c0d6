"""The Python API. The CLI only parses options and calls these functions."""
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
from .models.config import load_config
from .models.decoder import load_model

__all__ = ["load_adapter", "save_adapter", "inspect", "forward", "convert_adapter", "Checkpoint", "load_model",
           "Adapter"]


def detect(path: str | os.PathLike) -> str:
    """'peft', 'kohya', 'checkpoint' or raise InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", p)
    if p.is_dir():
        if (p / peft.CONFIG).is_file():
            return "peft"
        if (p / "config.json").is_file():
            return "checkpoint"
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


def load_adapter(path: str | os.PathLike, base: str | os.PathLike | None = None, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT folder or a kohya file. With ``base``, check that it fits the base model."""
    kind = detect(path)
    if kind == "peft":
        a = peft.read_peft(path, allow_pickle=allow_pickle)
    elif kind == "kohya":
        a = kohya.read_kohya(path, _module_names(base))
    else:
        raise InputError("this is a model checkpoint, not an adapter", path)
    if base is not None:
        from .arch.layout import align_adapter

        with Checkpoint.open(base) as ck:
            shapes = {k: ck.info(k).shape for k in ck.keys()}
        cfg = load_config(base)
        if cfg.tie_word_embeddings and "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        align_adapter(a, shapes).check_against(shapes, f"base model {base}")  # PEFT names vs the saved layout
    return a


def save_adapter(adapter: Adapter, out: str | os.PathLike, fmt: str = "peft", overwrite: bool = False,
                 inputs: Iterable = (), num_layers: int | None = None) -> Path:
    check_output(out, inputs, overwrite)
    if fmt == "peft":
        return peft.write_peft(adapter, out, num_layers=num_layers)
    if fmt == "kohya":
        return kohya.write_kohya(adapter, out)
    raise InputError(f"unknown adapter format {fmt!r} (peft or kohya)")


def convert_adapter(src: str | os.PathLike, out: str | os.PathLike, fmt: str, base=None, overwrite=False) -> Path:
    a = load_adapter(src, base)
    n = load_config(base).num_hidden_layers if base else None
    return save_adapter(a, out, fmt, overwrite=overwrite, inputs=[src, base], num_layers=n)


# -- inspect -----------------------------------------------------------------------------------
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
    return {"vllm": vllm, "llama.cpp": llama, "onnxruntime": ort, "peft": peft_w}


def inspect_adapter(a: Adapter, path) -> dict:
    dtypes = sorted({st.DTYPE_NAMES.get(m.A.dtype, str(m.A.dtype)) for m in a.modules.values()})
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else Path(path).stat().st_size
    mods = {n: {"kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale, "in": m.in_features,
                "out": m.out_features, "params": m.num_parameters(), "bias": m.bias is not None,
                "dora": m.magnitude is not None} for n, m in sorted(a.modules.items())}
    return {"type": "adapter", "format": a.format, "path": str(path), "modules": mods,
            "num_modules": len(mods), "ranks": sorted({m.rank for m in a.modules.values()}),
            "use_rslora": a.use_rslora, "use_dora": a.use_dora,
            "modules_to_save": {k: list(t.shape) for k, t in sorted(a.modules_to_save.items())},
            "parameters": a.num_parameters(), "dtypes": dtypes, "size_bytes": size,
            "base_model_name_or_path": a.config.get("base_model_name_or_path"),
            "warnings": compat_warnings(a)}


def inspect_checkpoint(path, allow_pickle: bool = False) -> dict:
    cfg = load_config(path) if Path(path).is_dir() else None
    with Checkpoint.open(path, allow_pickle=allow_pickle, require_config=cfg is not None) as ck:
        out = {"type": "checkpoint", "path": str(path), "parameters": ck.num_parameters, "tensors": len(ck.keys()),
               "dtypes": ck.dtypes(), "size_bytes": ck.total_bytes,
               "shards": [{"file": f.name, "tensors": len(names), "bytes": sum(ck.info(n).nbytes for n in names)}
                          for f, names in ck.by_shard()],
               "largest_tensor": max(((ck.info(n).nbytes, n) for n in ck.keys()), default=(0, None))[1]}
    if cfg is not None:
        out.update({"architecture": cfg.model_type, "architectures": cfg.raw.get("architectures"),
                    "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                    "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                    "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                    "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
                    "rope_scaling": cfg.rope_scaling})
    return out


def inspect(path: str | os.PathLike, allow_pickle: bool = False, base: str | os.PathLike | None = None) -> dict:
    kind = detect(path)
    if kind == "checkpoint":
        return inspect_checkpoint(path, allow_pickle)
    return inspect_adapter(load_adapter(path, base=base, allow_pickle=allow_pickle), path)


# -- forward -----------------------------------------------------------------------------------
def tokenize(model_dir: str | os.PathLike, text: str) -> list[int]:
    from tokenizers import Tokenizer

    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise InputError("no tokenizer.json to encode the prompt (forward takes --ids instead of a prompt)", model_dir)
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load tokenizer: {str(e).splitlines()[0]}", p) from e
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
