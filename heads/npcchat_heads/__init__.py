"""npcchat_heads: the head side of npcchat (ONNX graph builder; later readers and fitter).

Installed as ``npcchat_heads`` from the repository's ``heads/`` directory.
"""
