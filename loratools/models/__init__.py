from .config import ModelConfig, load_config
from .decoder import DecoderLM, load_model

__all__ = ["ModelConfig", "load_config", "DecoderLM", "load_model"]
