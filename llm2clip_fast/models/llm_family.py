"""Which kind of language model a ``transformers`` config describes.

Both the prompt templates (an encoder gets no instruction template) and the LLM encoder (llm2vec's
conventions apply to decoders only) branch on it, so it lives below both.
"""

from __future__ import annotations

from typing import Any


def is_decoder_only(config: Any) -> bool:
    """True for causal-LM families (Llama, Mistral, Qwen2, Gemma...), False for BERT-like encoders."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False  # BERT & co. also have a causal-LM head class, but they are encoders
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
