"""Merge adapters into base weights (and unmerge them), streamed tensor by tensor.

    W' = W + Σ wᵢ sᵢ Bᵢ Aᵢ          (embeddings: + Σ wᵢ sᵢ (Bᵢ Aᵢ)ᵀ; lora_bias: b' = b + Σ wᵢ sᵢ bᵢ)
    DoRA: W' = m / ‖W + s B A‖_row · (W + s B A)

computed in fp32 and rounded once to the output dtype. The output manifest (names, shapes,
dtypes) is known from the base's headers, so the sharded writer places every tensor as soon as
it is computed: peak memory is about one tensor, not one shard or one model.

Tied embeddings: when an adapter changes only one of embed_tokens / lm_head of a tied model,
the unmerged model uses the changed weight on one side and the base weight on the other; the
merged checkpoint unties them (tie_word_embeddings=false, lm_head.weight written) so that it
computes the same thing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .. import st
from ..adapter import Adapter
from ..checkpoint import Checkpoint, CheckpointWriter, DEFAULT_MAX_SHARD
from ..errors import IncompatibleError, UnsupportedError
from ..fsutil import check_output
from ..models.config import load_config
from .common import CONFIG_DTYPE, check_finite, pick_device, progress


def _shapes(ck: Checkpoint, tied: bool) -> dict[str, tuple]:
    shapes = {k: ck.info(k).shape for k in ck.keys()}
    if tied and "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def merge(base: str | os.PathLike, adapters: Sequence[Adapter], out: str | os.PathLike,
          weights: Sequence[float] | None = None, dtype: torch.dtype | None = None,
          max_shard_size: int | str = DEFAULT_MAX_SHARD, device: str = "auto", overwrite: bool = False,
          unmerge: bool = False, quiet: bool = True) -> dict:
    """Write base + adapters (or base − adapters with ``unmerge``) as a new checkpoint."""
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise IncompatibleError(f"{len(weights)} weights for {len(adapters)} adapters")
    check_output(out, [base] + [a.source for a in adapters if a.source], overwrite)
    sign = -1.0 if unmerge else 1.0
    dev = pick_device(device)
    cfg = load_config(base)
    for a in adapters:
        if unmerge and a.use_dora:
            raise UnsupportedError("a DoRA merge cannot be undone exactly (the row norms of the original weight are lost)", a.source or None)
        if unmerge and a.modules_to_save:
            raise UnsupportedError("modules_to_save replaced whole tensors; the originals cannot be recovered by unmerge", a.source or None)
    dora_mods = [n for a in adapters for n, m in a.modules.items() if m.magnitude is not None]
    if dora_mods and len(adapters) > 1:
        touched = [n for a in adapters for n in a.modules]
        clash = [n for n in set(dora_mods) if touched.count(n) > 1]
        if clash:
            raise UnsupportedError(f"module {clash[0]!r} has a DoRA adapter and another adapter; merge them one at a time", None)
    saved = {}
    for a in adapters:
        for k, t in a.modules_to_save.items():
            if k in saved:
                raise IncompatibleError(f"two adapters both replace {k!r} (modules_to_save)", a.source or None)
            saved[k] = t
    report = {"base": str(base), "out": str(out), "adapters": [a.source for a in adapters], "weights": weights,
              "unmerge": unmerge, "device": str(dev), "modified": []}
    with Checkpoint.open(base) as ck:
        tied = cfg.tie_word_embeddings and "lm_head.weight" not in ck
        shapes = _shapes(ck, cfg.tie_word_embeddings)
        for a in adapters:
            a.check_against(shapes, f"base model {base}")
        by_tensor: dict[str, list] = {}
        for a, w in zip(adapters, weights):
            for n, m in a.modules.items():
                by_tensor.setdefault(f"{n}.weight", []).append((m, w * sign))
                if m.bias is not None:
                    by_tensor.setdefault(f"{n}.bias", []).append((m, w * sign))
        untie = tied and any(k in by_tensor or k in saved for k in ("lm_head.weight", "model.embed_tokens.weight"))
        names = ck.keys()
        specs = []
        for n in names:
            i = ck.info(n)
            od = dtype if dtype is not None and i.dtype.is_floating_point else i.dtype
            specs.append(st.TensorInfo(n, od, i.shape))
        if untie:
            e = ck.info("model.embed_tokens.weight")
            specs.append(st.TensorInfo("lm_head.weight", dtype or e.dtype, e.shape))
        config = dict(cfg.raw)
        if dtype is not None:
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = CONFIG_DTYPE[dtype]
        if untie:
            config["tie_word_embeddings"] = False
            report["untied_embeddings"] = True

        def produce(spec: st.TensorInfo) -> torch.Tensor:
            src = spec.name if spec.name in ck else "model.embed_tokens.weight"  # untied lm_head
            key = spec.name
            if key in saved:
                return saved[key].to(spec.dtype)
            ups = by_tensor.get(key, [])
            t = ck.get(src)
            if not ups:
                return t if t.dtype == spec.dtype else t.to(spec.dtype)
            check_finite(t, src, ck.path)
            W = t.to(dev, torch.float32)
            for m, w in ups:
                if key.endswith(".bias"):
                    W += (m.scale * w) * m.bias.to(dev, torch.float32)
                    continue
                B, A = m.B.to(dev, torch.float32), m.A.to(dev, torch.float32)
                if m.kind == "embedding":  # ΔE = s·(B A)ᵀ = s·Aᵀ Bᵀ
                    W.addmm_(A.T, B.T, alpha=m.scale * w)
                else:  # in place: no dense ΔW beside W
                    W.addmm_(B, A, alpha=m.scale * w)
                if m.magnitude is not None:
                    W *= (m.magnitude.to(dev, torch.float32) / torch.linalg.norm(W, dim=1))[:, None]
            report["modified"].append(key)
            return W.to(spec.dtype).cpu()

        with CheckpointWriter(out, specs, max_shard_size=max_shard_size, aux_from=ck.root, config=config) as wr:
            for spec in progress(specs, "unmerge" if unmerge else "merge", quiet=quiet):
                src = spec.name if spec.name in ck else "model.embed_tokens.weight"
                if spec.name not in saved and spec.name not in by_tensor and wr.copy_from(spec.name, ck, src):
                    continue  # unchanged: bytes copied file to file, never loaded
                wr.write(spec.name, produce(spec))
    missing = [k for k in by_tensor if k not in report["modified"]]
    if missing:  # check_against guarantees presence; a tied lm_head LoRA lands on the untied copy
        raise IncompatibleError(f"could not apply LoRA to {missing[:3]}", base)
    return report
