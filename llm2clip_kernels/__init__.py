"""Triton kernels, installed as llm2clip_fast.kernels (never a top-level `kernels` module)."""
