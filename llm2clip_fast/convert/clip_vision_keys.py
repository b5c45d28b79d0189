"""Transformers CLIP vision-tower keys, mapped onto the tower inside :class:`LLM2CLIPModel`.

Our tower is ``vision.model`` = a transformers ``CLIPVisionModel``. Depending on the transformers
version its parameters are named ``embeddings...`` (5.x) or ``vision_model.embeddings...`` (4.x); a
source names them ``vision_model.<name>`` inside ``CLIPModel`` / ``CLIPVisionModelWithProjection`` /
the LLM2CLIP HF release, and ``vision_model.<name>`` or ``<name>`` in a ``CLIPVisionModel`` folder.
Checkpoints from transformers < 4.31 also stored the ``position_ids`` buffer (``arange``); it is
dropped after checking that it holds exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import SourceMismatchError

TOWER_PREFIX = "vision.model."
_INNER = "vision_model."


def vision_plan(target_keys: list[str], source_prefix: str) -> dict[str, str]:
    """``{source key: target key}`` for every parameter of our tower, the source naming it
    ``source_prefix + <name without any vision_model. prefix>``."""
    plan: dict[str, str] = {}
    for target in target_keys:
        if not target.startswith(TOWER_PREFIX):
            continue
        name = target[len(TOWER_PREFIX):].removeprefix(_INNER)
        plan[source_prefix + name] = target
    return plan


def position_ids_key(source_prefix: str) -> str:
    return f"{source_prefix}embeddings.position_ids"


def check_position_ids(source: Mapping[str, torch.Tensor], source_prefix: str) -> None:
    """A stored ``position_ids`` buffer must be ``arange(num_positions)`` (all the model ever used)."""
    key = position_ids_key(source_prefix)
    if key not in source:
        return
    ids = source[key]
    expected = torch.arange(ids.shape[-1]).reshape(ids.shape)
    if ids.is_floating_point() or not torch.equal(ids.to(torch.int64), expected):
        raise SourceMismatchError(f"{key} is not arange({ids.shape[-1]}); refusing to drop a buffer that "
                                  "changes the model")
