"""Bidirectional attention for decoder-only LLMs loaded with ``transformers`` >= 5.

LLM2CLIP (after llm2vec) lets every token of a caption attend to every other token, keeping only
the padding mask. transformers 5 builds attention masks in ``masking_utils``: ``create_causal_mask``
and ``create_sliding_window_causal_mask`` fall back to the bidirectional variants when
``config.is_causal`` is False, for every model family that builds its masks there (Llama, Mistral,
Qwen2, Gemma, ...). That covers the masks handed to eager and SDPA attention. Two more places read
causality from the attention module's own ``is_causal`` attribute instead of the mask:

- SDPA: with no padding the bidirectional mask is skipped (``None``) and the integration then passes
  ``is_causal=module.is_causal`` to ``scaled_dot_product_attention``;
- flash-attention: padding is handled by un-padding and causality comes from ``module.is_causal``.

So the one mechanism used here sets ``config.is_causal`` and every attention module's ``is_causal``
together, which is what the library itself does for its natively bidirectional variants (e.g.
Gemma's ``use_bidirectional_attention``). Nothing is monkey-patched, it survives ``save_pretrained``,
and it is reversible.
"""

from __future__ import annotations

import torch.nn as nn
from transformers import PreTrainedConfig


def _configs_of(model: nn.Module) -> list[PreTrainedConfig]:
    found: list[PreTrainedConfig] = []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PreTrainedConfig) and all(cfg is not c for c in found):
            found.append(cfg)
    return found


def set_bidirectional(model: nn.Module, enabled: bool = True) -> int:
    """Switch a decoder LLM between bidirectional (``enabled=True``) and causal attention, in place.

    Returns the number of attention modules switched. Raises ``ValueError`` when the model has no
    module with an ``is_causal`` flag (it would silently stay causal).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for cfg in _configs_of(model):
        cfg.is_causal = not enabled
        if hasattr(cfg, "use_bidirectional_attention"):
            cfg.use_bidirectional_attention = bool(enabled)
    switched = 0
    for module in model.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = not enabled
            switched += 1
    if switched == 0:
        raise ValueError(
            f"{type(model).__name__} has no attention module with an `is_causal` flag; cannot make it "
            "bidirectional with transformers' mask functions"
        )
    return switched


def is_bidirectional(model: nn.Module) -> bool:
    """True when every ``is_causal`` flag of the model (configs and attention modules) is False."""
    flags = [getattr(cfg, "is_causal", True) for cfg in _configs_of(model)]
    flags += [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)
