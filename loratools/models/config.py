"""Compatibility layer: the config reader moved to ``loratools.arch`` (spec, registry, hf_config).
``ModelConfig``, ``load_config``, ``parse_config`` and ``rope_inv_freq`` keep working from here."""
from __future__ import annotations

from ..arch.hf_config import LayerSpec, ModelConfig, RopeSpec, load_config, parse_config, rope_inv_freq
from ..arch.registry import FAMILIES

ROPE_TYPES = ("default", "linear", "llama3", "longrope")

__all__ = ["FAMILIES", "LayerSpec", "ModelConfig", "ROPE_TYPES", "RopeSpec", "load_config", "parse_config",
           "rope_inv_freq"]
