"""What the tensor operations need to know about a checkpoint, and nothing about its family.

merge, unmerge, extract, resize, combine, scale, subtract, convert and inspect work on any
Hugging Face decoder checkpoint: the adapter's modules are matched to the checkpoint's 2-D weights
by name and shape. Beyond names and shapes they need three facts from config.json, read here
without any per-family table (``read_model_info``): ``model_type`` (a label: reports, the
"same model" check of extract), whether the embeddings are tied, and ``num_hidden_layers`` when
it is there (PEFT's target list by leaf name).

Tied embeddings, in this one place (``tied_pair`` and ``with_tied_head``): a tied model's output
head computes with the input embedding; its checkpoint stores the embedding only (or a head that
transformers ignores). The rule, for any family:

- a checkpoint with an embedding and no head tensor is tied, whatever config.json says
  (``save_pretrained`` of a tied model never stores the head; an untied one always does; with
  tie_word_embeddings false and no head, transformers would start from a random head — there is
  nothing else to compute with);
- one that stores a head is tied when config.json says ``tie_word_embeddings: true`` (top level,
  else in ``text_config``): transformers then ignores the stored head;
- when the field is absent transformers (5.x) falls back on the family's config-class default
  (LlamaConfig, Qwen2Config: false; Gemma2Config, Gemma3TextConfig: true; a class without the
  field: false), which a tool without family knowledge cannot know; the tensors
  decide (above). A checkpoint that stores a head, omits the field and belongs to a family that
  defaults to true (no transformers save writes that) is read as untied.

The embedding is the checkpoint's one ``…embed_tokens.weight``; the head is ``lm_head.weight``
beside it (``language_model.model.embed_tokens.weight`` → ``language_model.lm_head.weight``,
as Gemma 3's multimodal checkpoints lay out their text model; ``model.language_model.…`` →
``lm_head.weight``, transformers 5's layout). Every other name passes through unchanged.

Bias switches (``bias_switches``, from the architecture registry): a LoRA with ``lora_bias`` on a layer without a bias can only be
merged by turning the bias on, which a family allows through a config field governing a set of
modules (Llama's ``attention_bias`` for q/k/v/o, ``mlp_bias`` for gate/up/down). That is per-family
knowledge, read from the family's registry entry (loratools/arch/registry.py): a tensor operation
that needs nothing else of the family still works for families the registry does not know.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .checkpoint import read_json
from .errors import InputError

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    tie_word_embeddings: bool | None    # as config.json says it; None when it does not (see tied_pair)
    num_hidden_layers: int | None
    raw: dict = field(default_factory=dict, repr=False)
    path: Path | None = None


def _field(cfg: dict, key: str, typ, path: Path):
    v = cfg.get(key)
    if v is None:
        return None
    ok = isinstance(v, bool) if typ is bool else (isinstance(v, typ) and not isinstance(v, bool))
    if not ok:
        raise InputError(f"field {key!r} must be {'a boolean' if typ is bool else 'an integer'}, got {v!r}", path)
    return v


def parse_model_info(cfg: dict, path: str | os.PathLike = "config.json") -> ModelInfo:
    path = Path(path)
    mt = cfg.get("model_type")
    if mt is None:
        raise InputError("missing field 'model_type'", path)
    if not isinstance(mt, str) or not mt:
        raise InputError(f"field 'model_type' must be a string, got {mt!r}", path)
    text = cfg.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise InputError(f"field 'text_config' must be an object, got {text!r}", path)
    tie = _field(cfg, "tie_word_embeddings", bool, path)
    if tie is None and text:
        tie = _field(text, "tie_word_embeddings", bool, path)
    layers = _field(cfg, "num_hidden_layers", int, path)
    if layers is None and text:
        layers = _field(text, "num_hidden_layers", int, path)
    if layers is not None and layers <= 0:
        raise InputError(f"field 'num_hidden_layers' must be positive, got {layers}", path)
    return ModelInfo(mt, tie, layers, dict(cfg), path)


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """config.json of a checkpoint folder (or the folder of a .safetensors file) -> ModelInfo."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", p)
    if p.is_dir():
        p = p / "config.json"
    elif p.name != "config.json":
        p = p.parent / "config.json"
    return parse_model_info(read_json(p, "config.json"), p)


# -- tied embeddings -----------------------------------------------------------------------------
def embed_name(names: Iterable[str]) -> str | None:
    """The checkpoint's input embedding tensor: ``model.embed_tokens.weight``, else the one name
    ending in ``embed_tokens.weight`` (a multimodal checkpoint's text model), else None."""
    names = list(names)
    if EMBED in names:
        return EMBED
    found = [n for n in names if n.endswith(".embed_tokens.weight") and "vision" not in n]
    return found[0] if len(found) == 1 else None


def head_name(embed: str | None) -> str:
    """The output head that sits beside ``embed`` (lm_head.weight for the usual layout)."""
    if embed is None or embed == EMBED:
        return HEAD
    prefix = embed[: -len("embed_tokens.weight")]      # "language_model.model." / "model.language_model."
    if prefix.endswith("model.") and not prefix.endswith("language_model."):
        return prefix[: -len("model.")] + HEAD          # language_model.model. -> language_model.lm_head.weight
    return HEAD


def tied_pair(info, names: Iterable[str]) -> tuple[str, str] | None:
    """(embedding, head) tensor names when the model ties its head to its embedding, else None.
    ``info``: a ModelInfo, a ModelConfig (anything with ``tie_word_embeddings``) or None."""
    names = set(names)
    emb = embed_name(names)
    if emb is None:
        return None
    head = head_name(emb)
    tie = head not in names or getattr(info, "tie_word_embeddings", None) is True
    return (emb, head) if tie else None


def with_tied_head(shapes: Mapping[str, tuple], pair: tuple[str, str] | None) -> dict[str, tuple]:
    """The checkpoint's shapes plus the tied head's (it computes with the embedding), so that an
    adapter on lm_head of a tied model fits."""
    out = dict(shapes)
    if pair is not None and pair[1] not in out:
        out[pair[1]] = out[pair[0]]
    return out


def head_source(name: str, pair: tuple[str, str] | None) -> str:
    """The stored tensor a name computes with: a tied head is its embedding."""
    return pair[0] if pair is not None and name == pair[1] else name


# -- bias switches -------------------------------------------------------------------------------
def bias_switches(model_type: str) -> dict[str, tuple[str, ...]]:
    """config field -> module leaf names whose bias it turns on, from the family's entry in the
    architecture registry (``qkv_bias`` / ``o_bias`` / ``mlp_bias`` name the field, as transformers'
    modeling files pass ``bias=config.attention_bias`` / ``config.mlp_bias``); {} for a family
    the registry does not know or one whose biases have no switch."""
    from .arch.registry import FAMILIES

    spec = FAMILIES.get(model_type)
    if spec is None:
        return {}
    qkv = ("qkv_proj",) if spec.fused_qkv else ("q_proj", "k_proj", "v_proj")
    mlp = ("gate_up_proj", "down_proj") if spec.fused_gate_up else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, tuple[str, ...]] = {}
    for fld, leaves in ((spec.qkv_bias, qkv), (spec.o_bias, ("o_proj",)), (spec.mlp_bias, mlp)):
        if isinstance(fld, str):
            out[fld] = out.get(fld, ()) + leaves
    return out


def bias_switch(model_type: str, leaf: str) -> str | None:
    """The config field that turns on the bias of module ``leaf`` in this family, if any."""
    for key, leaves in bias_switches(model_type).items():
        if leaf in leaves:
            return key
    return None
