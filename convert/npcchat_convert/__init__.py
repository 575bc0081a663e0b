"""npcchat_convert: the model side of npcchat (HF Qwen2 -> GGUF, LoRA merge, quantize, and the
tiny-model factory that tests, benchmarks and the demo share).

Installed as ``npcchat_convert`` from the repository's ``convert/`` directory.
"""
