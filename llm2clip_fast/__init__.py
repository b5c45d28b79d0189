"""llm2clip_fast: fast LLM2CLIP training.

Fused large-batch contrastive losses, a fused text adapter, 8-bit frozen-LLM inference and a lean
trainer for both LLM2CLIP stages. ``python -m llm2clip_fast.info`` shows what was built and which
backend serves each op on this machine.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
