"""LoRA training on loratools' reference models: data loading (data.py) and the loop (loop.py)."""
