"""The trainer: ``python -m llm2clip_fast.train [stage1|embed|stage2|eval]``; no sub-command runs the demo pipeline."""
