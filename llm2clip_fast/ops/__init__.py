"""Fused ops. Each op module registers its backends with :mod:`llm2clip_fast.ops._backend` on import."""
