"""Adapter and model formats. Each module translates one on-disk format to and from the
in-memory types (Adapter, Checkpoint); nothing else knows a format's key names."""
