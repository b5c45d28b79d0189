"""What stage 2 takes from a pretrained start besides the tower: its logit scale (and SigLIP bias).

``--vision-path FOLDER`` (a transformers CLIP/SigLIP folder) and ``--vision-timm NAME
--vision-timm-checkpoint FILE`` start the tower from pretrained weights; as in the official LLM2CLIP run
(which keeps its starting checkpoint's ``logit_scale``, see
:mod:`llm2clip_fast.convert.pretrained_logit_scale`) the model's logit scale then starts at the
checkpoint's value under ``--logit-scale-init pretrained`` (the default) and at ln(1/0.07) under
``new`` or when the checkpoint holds none for the run's loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..convert.pretrained_logit_scale import (
    BIAS_KEYS,
    SCALE_KEYS,
    describe,
    find_pretrained_logit_params,
    scalar_like,
)
from ..models.llm2clip import LLM2CLIPModel


def folder_logit_tensors(folder: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The logit tensors of a transformers folder's safetensors weights (only those are read), and why
    none could be read (a folder with pickled weights only)."""
    from ..convert.source_files import read_safetensors_tensor

    found: dict[str, torch.Tensor] = {}
    try:
        for key in (*SCALE_KEYS, *BIAS_KEYS):
            value = read_safetensors_tensor(Path(folder), key)
            if value is not None:
                found[key] = value
    except FileNotFoundError:
        return {}, f"{folder} has no safetensors weights to read a logit_scale from"
    return found, None


def start_logit_params(model: LLM2CLIPModel, tensors: Mapping[str, torch.Tensor], init: str,
                       where: str) -> str:
    """Copy the logit scale (and bias) that ``init`` keeps from ``tensors`` into ``model`` (see the module
    docstring); returns the line to log."""
    params = find_pretrained_logit_params(tensors, model.config.loss, init, where)
    if params.found:
        with torch.no_grad():
            model.logit_scale.copy_(scalar_like(tensors[params.scale_key], model.logit_scale))
            if params.bias_key is not None and model.logit_bias is not None:
                model.logit_bias.copy_(scalar_like(tensors[params.bias_key], model.logit_bias))
    line = describe(params, tensors, where)
    if not params.found:
        line += f": {model.logit_scale.item():.4f}"
    return line
