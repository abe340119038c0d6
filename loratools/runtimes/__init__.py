"""Runtimes: each gives logits for token ids from an artifact in its own engine."""
