"""llm2clip_fast: fast LLM2CLIP training.

Fused large-batch contrastive losses, a fused text adapter, 8-bit frozen-LLM inference and a lean
trainer for both LLM2CLIP stages. ``python -m llm2clip_fast.info`` shows what was built and which
backend serves each op on this machine.

The public names below are imported on first use, so ``import llm2clip_fast`` stays cheap (it does
not import transformers or Triton).
"""

from __future__ import annotations

import importlib
from typing import Any

from .third_party_notices import quiet_unactionable_notices

__version__ = "0.1.0"

quiet_unactionable_notices()

_LAZY = {
    "clip_loss": "llm2clip_fast.ops.clip_loss",
    "siglip_loss": "llm2clip_fast.ops.siglip_loss",
    "masked_mean_pool": "llm2clip_fast.ops.masked_mean_pool",
    "text_adapter": "llm2clip_fast.ops.adapter",
    "ClipLoss": "llm2clip_fast.losses",
    "SigLipLoss": "llm2clip_fast.losses",
    "TextAdapter": "llm2clip_fast.models.text_adapter",
    "TextAdapterReference": "llm2clip_fast.models.text_adapter",
    "LLMTextEncoder": "llm2clip_fast.models.llm_encoder",
    "LLM2CLIPModel": "llm2clip_fast.models.llm2clip",
    "EmbeddingCache": "llm2clip_fast.data.embedding_cache",
    "open_source": "llm2clip_fast.data.sources",
    "build_loader": "llm2clip_fast.data.loader",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llm2clip_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
