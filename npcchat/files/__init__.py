"""File helpers every package shares: atomic writes (``atomic``), TOML reading with one-line
errors (``toml``), and a small numpy safetensors reader/writer (``safetensors``, used by
the converter and the head loader). Imports nothing of npcchat but ``errors``.
"""
