"""The text side of an EVA-CLIP-style LLM2CLIP state dict (as the official repository trains it).

The official ``CustomCLIP`` (microsoft/LLM2CLIP ``llm2clip/eva_clip/model.py``, commit
cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a) holds ``visual`` (an EVA02 ViT), ``text`` (a ``TextProj``:
keys ``text.text_adaptor.{0..n-1}.fn.{0,3}`` / ``.ln``, ``.n`` LayerNorm, ``.n+1`` Linear) and
``logit_scale``; on cached embeddings ``encode_text`` calls ``TextProj.forward(x)`` with its default
``l2_norm=True``, hence ``input_norm="l2"`` here.

This module maps the text side only. The ``visual.*`` EVA02 tower (RoPE, SwiGLU, sub-LN) is to go
through timm's EVA implementation, which is not a dependency yet; its keys are returned untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..models.text_adapter import TextAdapter
from .adapter_keys import adapter_geometry, adapter_plan
from .strict_mapping import apply_plan

TEXT_PREFIX = "text.text_adaptor."
VISION_PREFIX = "visual."


@dataclass
class EvaClipTextSide:
    """``adapter``: TextAdapter keyword arguments (with ``in_dim``/``out_dim``); ``tensors``: our
    ``text_adapter.*`` and ``logit_scale`` entries (source dtype); ``vision_keys``: the ``visual.*``
    keys left for the EVA02 tower."""

    adapter: dict[str, int | float | str]
    tensors: dict[str, torch.Tensor]
    vision_keys: list[str]


def map_eva_clip_text_side(state: Mapping[str, torch.Tensor], input_norm: str = "l2") -> EvaClipTextSide:
    """Map ``text.text_adaptor.*`` and ``logit_scale`` strictly; any key outside those and ``visual.*``
    is an error (SourceMismatchError listing it)."""
    geometry = adapter_geometry(state, TEXT_PREFIX)
    adapter = {"in_dim": geometry.llm_dim, "out_dim": geometry.embed_dim, "num_blocks": geometry.num_blocks,
               "expansion": geometry.expansion, "dropout": 0.0, "input_norm": input_norm}
    with torch.device("meta"):
        skeleton = TextAdapter(**adapter)
    target_shapes = {f"text_adapter.{k}": tuple(v.shape) for k, v in skeleton.state_dict().items()}
    target_shapes["logit_scale"] = ()
    plan = adapter_plan(geometry, TEXT_PREFIX)
    plan["logit_scale"] = "logit_scale"
    result = apply_plan(state, plan, target_shapes, drop=lambda k: k.startswith(VISION_PREFIX),
                        what="the EVA-CLIP state dict's text side")
    return EvaClipTextSide(adapter=adapter, tensors=result.tensors, vision_keys=result.dropped)
