"""``--from llm2clip-hf``: a released Hugging Face-format LLM2CLIP folder (microsoft/LLM2CLIP-Openai-B-16,
-L-14-224, -L-14-336) -> an :class:`LLM2CLIPModel`.

Only ``config.json`` and the safetensors are read; the folder's remote code is never imported or run.
The tensors the release holds:

- ``vision_model.*``: a transformers CLIP vision transformer described by ``config.json``'s
  ``vision_config``; its pooled output (post-LayerNorm class token) is the image feature, as in
  transformers' ``CLIPModel.get_image_features``;
- ``visual_projection.weight``: Linear(hidden -> projection_dim), no bias;
- ``text_adapter.adaptor.*``: the official adapter ``nn.Sequential`` (``LinearBlock`` x n, LayerNorm,
  Linear; layout in :mod:`llm2clip_fast.convert.adapter_keys`);
- ``logit_scale``: the learnt log logit scale.

Input normalisation of the adapter (``input_norm``, default ``"l2"``): the releases' remote modeling
file (``config.json`` ``auto_map`` -> ``modeling_llm2clip.py``) is not on GitHub and could not be read
from this build machine (no Hub access), so what its ``get_text_features`` does before the adapter is
not known first-hand. The default follows the official training code: the released configs take
``"use_embedding": true`` (``llm2clip/eva_clip/model_configs/OpenaiCLIP-*.json``), which builds
``TextProj`` and trains it on cached LLM2Vec embeddings through ``TextProj.forward(text,
l2_norm=True)`` (microsoft/LLM2CLIP ``llm2clip/eva_clip/model.py`` at commit cba3b45ba3d9); the
``l2_norm=False`` call belongs to ``LLM2VecTextTransformer`` (``use_embedding: false``, ``llm_model.py``),
a path none of the released configs takes. Two third-party projects that load the releases with
``trust_remote_code`` also describe the release's text adapter as normalising first. ``input_norm="none"``
converts for the other reading. The assumption is recorded in ``conversion.json``
(``adapter_input_norm_from``) and said loudly at conversion and whenever ``eval`` loads such a folder
(:mod:`.input_norm_notice`); README says how to check it on your own data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
from .adapter_keys import adapter_geometry, adapter_plan
from .assemble import assemble_model, skeleton_shapes
from .clip_vision_keys import check_position_ids, position_ids_key, vision_plan
from .errors import SourceMismatchError
from .source_files import read_config, read_safetensors_folder, require_folder, tower_preprocessing
from .strict_mapping import apply_plan

ADAPTER_PREFIX = "text_adapter.adaptor."
VISION_PREFIX = "vision_model."
DEFAULT_INPUT_NORM = "l2"
# conversion.json's adapter_input_norm_from when the default was taken (the notice looks for it).
ASSUMED = ("default: the official training code's TextProj.forward(l2_norm=True); the release's "
           "modeling_llm2clip.py was not read")


def convert_llm2clip_hf(source: str | Path, *, input_norm: str | None = None,
                        dtype: torch.dtype | None = None) -> tuple[LLM2CLIPModel, dict[str, Any]]:
    """Convert the folder ``source``; returns the model and a provenance record for ``conversion.json``.
    ``input_norm``: the adapter's input normalisation; None takes :data:`DEFAULT_INPUT_NORM` and records
    it as an assumption (see the module docstring)."""
    assumed = input_norm is None
    input_norm = DEFAULT_INPUT_NORM if assumed else input_norm
    folder = require_folder(source, "llm2clip-hf source")
    config = read_config(folder)
    vision_config = config.get("vision_config")
    if not isinstance(vision_config, dict):
        raise SourceMismatchError(f"{folder}/config.json has no 'vision_config' object; an LLM2CLIP HF "
                                  "release describes its CLIP vision tower there")
    vision_type = vision_config.get("model_type", "clip_vision_model")
    if vision_type != "clip_vision_model":
        raise SourceMismatchError(f"{folder}/config.json describes a {vision_type!r} vision tower; --from "
                                  "llm2clip-hf converts the releases with a CLIP vision transformer "
                                  "(LLM2CLIP-Openai-*); the EVA02 models convert from their EVA-CLIP state "
                                  "dict with --from eva-clip")
    tensors, files = read_safetensors_folder(folder)
    if not any(k.startswith(ADAPTER_PREFIX) for k in tensors):
        raise SourceMismatchError(f"{folder} holds no {ADAPTER_PREFIX}* tensors: not an LLM2CLIP release "
                                  "(a plain transformers CLIP folder converts with --from hf-clip)")
    geometry = adapter_geometry(tensors, ADAPTER_PREFIX)
    projection = tensors.get("visual_projection.weight")
    if projection is None:
        raise SourceMismatchError(f"{folder} has no visual_projection.weight")
    if projection.dim() != 2 or projection.shape[0] != geometry.embed_dim:
        raise SourceMismatchError(f"visual_projection.weight {tuple(projection.shape)} does not project onto "
                                  f"the adapter's output size {geometry.embed_dim}")
    declared = config.get("projection_dim")
    if declared is not None and declared != geometry.embed_dim:
        raise SourceMismatchError(f"config.json projection_dim={declared} but the tensors project to "
                                  f"{geometry.embed_dim}")
    model_config = LLM2CLIPConfig(
        vision={"kind": "clip", "config": dict(vision_config),
                "preprocessing": tower_preprocessing(folder, vision_config)},
        embed_dim=geometry.embed_dim,
        text_tower="llm-adapter",
        llm_dim=geometry.llm_dim,
        adapter={"num_blocks": geometry.num_blocks, "expansion": geometry.expansion, "dropout": 0.0,
                 "input_norm": input_norm},
        loss="clip",
    )
    target_shapes = skeleton_shapes(model_config)
    plan = vision_plan(list(target_shapes), VISION_PREFIX)
    plan.update(adapter_plan(geometry, ADAPTER_PREFIX))
    plan["visual_projection.weight"] = "visual_projection.weight"
    plan["logit_scale"] = "logit_scale"
    check_position_ids(tensors, VISION_PREFIX)
    dropped = {position_ids_key(VISION_PREFIX)}
    result = apply_plan(tensors, plan, target_shapes, drop=dropped.__contains__,
                        what=f"{folder} (as an LLM2CLIP HF release)")
    model = assemble_model(model_config, result.tensors, dtype=dtype)
    provenance = {
        "from": "llm2clip-hf",
        "source": str(folder.resolve()),
        "source_files": files,
        "dropped": result.dropped,
        "adapter_input_norm": input_norm,
        "adapter_input_norm_from": ASSUMED if assumed else "--input-norm",
        "official_code": "microsoft/LLM2CLIP llm2clip/eva_clip/model.py (LinearBlock, TextProj) at "
                         "cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a",
    }
    return model, provenance

