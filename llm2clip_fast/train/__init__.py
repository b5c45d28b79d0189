"""The trainer: ``python -m llm2clip_fast.train [stage1|embed|stage2|eval]``.

With no sub-command it runs the whole pipeline on the built-in demo set.
"""
