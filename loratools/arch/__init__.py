"""Architecture specs: one ArchSpec per family (registry.FAMILIES), config.json -> ModelConfig."""
from .hf_config import LayerSpec, ModelConfig, RopeSpec, load_config, parse_config, rope_inv_freq
from .registry import FAMILIES, get_spec
from .spec import ArchSpec

__all__ = ["ArchSpec", "FAMILIES", "LayerSpec", "ModelConfig", "RopeSpec", "get_spec", "load_config",
           "parse_config", "rope_inv_freq"]
