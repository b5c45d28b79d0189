"""Benchmarks for llm2clip_fast: one script per op, shared measurement helpers in ``bench/_common.py``."""
