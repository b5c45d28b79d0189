"""``--from hf-clip``: a plain transformers CLIP folder -> an :class:`LLM2CLIPModel` that starts stage 2.

The pretrained vision tower is kept, and so is a full ``CLIPModel``'s ``logit_scale`` (as the official
LLM2CLIP run keeps its starting checkpoint's; ``logit_scale_init="new"`` restarts it at ln(1/0.07), as
does a vision-only folder, which holds none: :mod:`.pretrained_logit_scale`); the text adapter is new
(seeded init). The visual projection is new unless ``keep_projection`` asks to keep the pretrained one,
which needs its output size to equal ``embed_dim`` (the official recipe re-initialises it; both are
possible). Accepted folders (``config.json`` ``model_type``):

- ``clip``: a full ``CLIPModel``; its text tower (``text_model.*``, ``text_projection.weight``) and
  ``logit_scale`` are dropped;
- ``clip_vision_model``: a ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``.

Stage 2's ``--vision-path FOLDER --keep-projection`` takes the projection through
:func:`load_kept_projection`, with the same checks as the conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.llm2clip import LLM2CLIPModel
from .assemble import assemble_model, check_new_head_sizes, pretrained_tower_config, skeleton_shapes
from .clip_vision_keys import check_position_ids, position_ids_key, vision_plan
from .errors import SourceMismatchError
from .pretrained_logit_scale import describe, find_pretrained_logit_params
from .source_files import (
    read_config,
    read_safetensors_folder,
    read_safetensors_tensor,
    require_folder,
    tower_preprocessing,
)
from .strict_mapping import apply_plan

_TEXT_TOWER_KEYS = ("text_model.", "text_projection.weight", "logit_scale")
PROJECTION_KEY = "visual_projection.weight"
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def check_kept_projection(projection: torch.Tensor | None, folder: Path, embed_dim: int | None,
                          hidden_size: int | None = None) -> int:
    """The embed dim a kept projection gives: ``embed_dim`` (which its output size must equal) or, when
    None, its output size. Errors name ``--keep-projection`` and what differs."""
    if projection is None:
        raise SourceMismatchError(f"--keep-projection: {folder} has no {PROJECTION_KEY} (a CLIPVisionModel "
                                  "without projection); drop --keep-projection to start a new one")
    if projection.dim() != 2:
        raise SourceMismatchError(f"--keep-projection: {folder}'s {PROJECTION_KEY} has shape "
                                  f"{tuple(projection.shape)}, expected (embed_dim, hidden_size)")
    if hidden_size is not None and projection.shape[1] != hidden_size:
        raise SourceMismatchError(f"--keep-projection: {folder}'s {PROJECTION_KEY} takes "
                                  f"{projection.shape[1]} features but its vision tower's hidden size is "
                                  f"{hidden_size}")
    if embed_dim is None:
        return int(projection.shape[0])
    if projection.shape[0] != embed_dim:
        raise ValueError(f"--keep-projection: the pretrained projection outputs {projection.shape[0]} "
                         f"features but --embed-dim is {embed_dim}")
    return embed_dim


def load_kept_projection(source: str | Path, embed_dim: int, hidden_size: int) -> torch.Tensor:
    """The ``visual_projection.weight`` (embed_dim, hidden_size) of the transformers CLIP folder
    ``source`` (a full ``CLIPModel`` or a ``CLIPVisionModelWithProjection``), read alone from its
    safetensors, in its stored dtype; checked as :func:`convert_hf_clip` checks it."""
    folder = require_folder(source, "--vision-path")
    model_type = read_config(folder).get("model_type")
    if model_type not in CLIP_MODEL_TYPES:
        raise ValueError(f"--keep-projection: {folder} holds a {model_type!r} model, which has no "
                         f"{PROJECTION_KEY}; only transformers CLIP folders ({', '.join(CLIP_MODEL_TYPES)}) "
                         "bring one")
    projection = read_safetensors_tensor(folder, PROJECTION_KEY)
    check_kept_projection(projection, folder, embed_dim, hidden_size)
    assert projection is not None  # check_kept_projection refuses None
    return projection


def convert_hf_clip(source: str | Path, *, llm_dim: int, embed_dim: int | None = None,
                    keep_projection: bool = False, num_blocks: int = 4, expansion: int = 2,
                    loss: str = "clip", seed: int = 0, input_norm: str = "l2",
                    dtype: torch.dtype | None = None,
                    logit_scale_init: str = "pretrained") -> tuple[LLM2CLIPModel, dict[str, Any]]:
    """Convert the folder ``source``; returns the model and a provenance record for ``conversion.json``.

    ``embed_dim`` may be omitted with ``keep_projection`` (the pretrained projection's size is used).
    ``logit_scale_init``: "pretrained" keeps the folder's ``logit_scale`` (a full CLIPModel's) for the
    CLIP loss, "new" starts at ln(1/0.07).
    """
    check_new_head_sizes(llm_dim, embed_dim, keep_projection)
    folder = require_folder(source, "hf-clip source")
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type == "clip":
        vision_config = config.get("vision_config")
        if not isinstance(vision_config, dict):
            raise SourceMismatchError(f"{folder}/config.json (model_type clip) has no 'vision_config' object")
    elif model_type == "clip_vision_model":
        vision_config = {k: v for k, v in config.items() if k not in {"architectures", "auto_map"}}
    else:
        raise SourceMismatchError(f"{folder}/config.json has model_type {model_type!r}; --from hf-clip takes "
                                  "'clip' or 'clip_vision_model' folders")
    tensors, files = read_safetensors_folder(folder)
    # transformers 5 saves a CLIPVisionModel without the vision_model. prefix; 4.x and CLIPModel use it.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    if keep_projection:
        embed_dim = check_kept_projection(tensors.get(PROJECTION_KEY), folder, embed_dim)
    model_config = pretrained_tower_config(vision_config, tower_preprocessing(folder, vision_config),
                                           embed_dim=embed_dim, llm_dim=llm_dim, num_blocks=num_blocks,
                                           expansion=expansion, input_norm=input_norm, loss=loss)
    target_shapes = skeleton_shapes(model_config)
    plan = vision_plan(list(target_shapes), prefix)
    fresh = [k for k in target_shapes if not k.startswith("vision.")]
    if keep_projection:
        plan[PROJECTION_KEY] = PROJECTION_KEY
        fresh.remove(PROJECTION_KEY)
    check_position_ids(tensors, prefix)
    logit = find_pretrained_logit_params(tensors, loss, logit_scale_init, str(folder))
    for ours_from, ours in logit.plan().items():
        tensors[ours_from] = tensors[ours_from].reshape(())
        plan[ours_from] = ours
        fresh.remove(ours)

    def drop(key: str) -> bool:
        if key == position_ids_key(prefix) or key == PROJECTION_KEY:
            return True
        return model_type == "clip" and key.startswith(_TEXT_TOWER_KEYS)

    result = apply_plan(tensors, plan, target_shapes, drop=drop, fresh=fresh,
                        what=f"{folder} (as a transformers CLIP folder)")
    model = assemble_model(model_config, result.tensors, seed=seed, dtype=dtype)
    provenance = {
        "from": "hf-clip",
        "source": str(folder.resolve()),
        "source_files": files,
        "kept_projection": keep_projection,
        "fresh": sorted(fresh),
        "seed": seed,
        "dropped": result.dropped,
        "logit_scale": describe(logit, tensors, str(folder)),
    }
    return model, provenance
