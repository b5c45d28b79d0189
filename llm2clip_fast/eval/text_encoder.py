"""The frozen LLM text encoder a saved llm-adapter model reads captions through, as its config recorded it."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch


def load_text_encoder(model: Any, llm: str | os.PathLike[str] | None = None,
                      template: str | None = None, device: str | torch.device | None = None,
                      quantize: str | None = None, *, allow_llm_change: bool = False) -> Any:
    """The frozen ``LLMTextEncoder`` an llm-adapter model reads captions through; None for a model
    with its own (clip) text tower.

    The path and encoder options (pooling, max length, instruction, compute dtype, ...) come from the
    model's config (``config.llm``: the embedding cache's settings, which stage 2 records, with the LLM
    folder under ``model`` or ``path``); ``llm`` overrides the path and ``template`` the recorded
    prompt template; ``device`` where the LLM runs (default: its loader's). The recorded precision and
    8-bit quantisation (``precision``, ``quantize``, ``quantize_keep``) are reproduced unless ``quantize``
    overrides the mode (``"none"``, ``"llm-int8"``, ``"w8a8-int8"``, ``"w8a8-fp8"``).

    Before loading, the LLM's files are checked against the fingerprint the model recorded
    (:func:`~llm2clip_fast.models.llm_fingerprint.check_llm_unchanged`): an LLM retrained in place
    raises :class:`~llm2clip_fast.models.llm_fingerprint.LLMChangedError` unless ``allow_llm_change``.
    """
    if model.config.text_tower != "llm-adapter":
        return None
    recorded = dict(model.config.llm or {})
    fingerprint_record = dict(recorded)
    recorded_path = recorded.pop("path", None) or recorded.pop("model", None)
    path = llm if llm is not None else recorded_path
    if not path:
        raise ValueError("the model's config records no LLM (config.llm.model / config.llm.path); pass --llm "
                         "PATH, the LLM its embedding cache was computed with")
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder
    from llm2clip_fast.models.llm_fingerprint import check_llm_unchanged

    check_llm_unchanged(fingerprint_record, path, lora=recorded.get("lora"), allow_change=allow_llm_change)

    if "model_dtype" in recorded and "dtype" not in recorded:
        recorded["dtype"] = recorded.pop("model_dtype")
    accepted = inspect.signature(LLMTextEncoder.from_pretrained).parameters
    options = {k: v for k, v in recorded.items() if k in accepted and k != "path" and v is not None}
    if template is not None:
        options["template"] = template
    if quantize is not None:
        if options.get("quantize", "llm-int8" if options.get("load_in_8bit") else "none") != quantize:
            # Another mode than the cache's: its 16-bit layer list does not apply.
            options.pop("quantize_keep", None)
        options["quantize"] = quantize
        options.pop("load_in_8bit", None)
    if device is not None:
        options["device"] = device
    encoder = LLMTextEncoder.from_pretrained(str(path), **options)
    if hasattr(encoder, "eval"):
        encoder.eval()
    return encoder
