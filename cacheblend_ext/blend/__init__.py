"""The blend: CacheBlend's selective recompute over a Hugging Face model.

``engine``: :class:`BlendEngine` and :class:`BlendConfig`; ``models``: the bundled
SmolLM2 model and local Hugging Face model directories.
"""
