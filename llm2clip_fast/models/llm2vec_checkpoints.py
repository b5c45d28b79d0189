"""Loading the LLMs LLM2Vec and LLM2CLIP publish, without their remote code.

- McGill's LLM2Vec checkpoints are a base model plus LoRA adapters applied in order (MNTP first,
  then the supervised/SimCSE one): :func:`apply_lora_chain` merges each into the weights before
  the next is loaded, as ``LLM2Vec.from_pretrained`` does with ``merge_peft``.
- LLM2CLIP's released LLM (``microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned``) is a full model
  folder whose config names an llm2vec encoder class (``LlamaEncoderModel``) with ``auto_map`` to
  remote code. Those classes are the family's base model with causal masking removed (llm2vec's
  ``LlamaBiModel`` & co.), so :func:`map_llm2vec_encoder` maps them to the transformers base model
  (``LlamaModel``), which the caller then makes bidirectional; the remote code is never run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

logger = logging.getLogger(__name__)

# llm2vec 0.2.3's bidirectional classes (llm2vec/models/bidirectional_*.py) and the encoder class
# names LLM2CLIP's released folders use for them.
_ENCODER_SUFFIXES = ("EncoderModel", "BiModel", "BiForMNTP")
_FAMILY_BASE = {"llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model",
                "gemma": "GemmaModel", "gemma2": "Gemma2Model"}


def llm2vec_encoder_class(config: Any) -> str | None:
    """The llm2vec encoder class the config names (``architectures`` or ``auto_map["AutoModel"]``),
    else None."""
    names = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoModel"), str):
        names.append(auto_map["AutoModel"].rsplit(".", 1)[-1])
    for name in names:
        if name.endswith(_ENCODER_SUFFIXES) and not name.endswith("ForCausalLM"):
            return name
    return None


def map_llm2vec_encoder(config: Any, folder: str | os.PathLike) -> str | None:
    """Point a config that names an llm2vec encoder class at the matching transformers base model.

    Drops ``auto_map`` (so nothing asks for remote code), sets ``architectures`` to the base model
    class and logs the mapping. Returns the original class name, or None when the config names none.
    Raises ``ValueError`` for a family transformers has no base model for here.
    """
    name = llm2vec_encoder_class(config)
    if name is None:
        return None
    family = getattr(config, "model_type", None)
    if family not in _FAMILY_BASE:
        raise ValueError(
            f"{folder}: config names the llm2vec encoder class {name} for model_type {family!r}; only "
            f"{sorted(_FAMILY_BASE)} can be loaded without its remote code"
        )
    remote = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if hasattr(config, "auto_map"):
        del config.auto_map
    config.architectures = [_FAMILY_BASE[family]]
    logger.warning(
        "%s: config names the llm2vec encoder class %s%s; loaded without remote code as transformers' %s "
        "with bidirectional attention (what that class is: the base model minus causal masking)",
        folder, name, f" (auto_map -> {remote})" if remote else "", _FAMILY_BASE[family],
    )
    return name


def normalize_lora_list(lora: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """``lora`` as a list of adapter folders: one path, a comma-separated string, or a sequence."""
    if lora is None:
        return []
    if isinstance(lora, (str, os.PathLike)):
        items: list[Any] = [p for p in str(lora).split(",") if p.strip()] if isinstance(lora, str) else [lora]
    else:
        items = list(lora)
    folders = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"lora entries must be paths, got {type(item).__name__}")
        folder = Path(str(item).strip()).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"lora={str(item)!r} is not a peft adapter folder (no adapter_config.json)")
        folders.append(folder)
    if not folders:
        raise ValueError(f"lora={lora!r} names no adapter folder")
    return folders


def apply_lora_chain(model: nn.Module, adapters: Sequence[Path], merge_last: bool) -> nn.Module:
    """Apply peft adapters in order; each but the last is merged before the next is loaded.

    The last is merged too when ``merge_last`` (else the peft-wrapped model is returned). The merged
    weights are ``W + sum_i delta_i``, each delta computed by peft from its adapter alone.
    """
    from peft import PeftModel

    for i, folder in enumerate(adapters):
        wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        last = i == len(adapters) - 1
        if last and not merge_last:
            return wrapped
        model = wrapped.merge_and_unload()
        logger.info("merged LoRA adapter %d/%d from %s", i + 1, len(adapters), folder)
    return model
