"""loratools: LoRA adapters for LLMs — load, train, re-factorize, merge, export, validate."""
__version__ = "0.1.0"
