"""The logit scale (and SigLIP logit bias) a pretrained start brings to stage 2.

The official LLM2CLIP run starts stage 2 from a CLIP-trained checkpoint and keeps its ``logit_scale``:
``load_checkpoint`` in microsoft/LLM2CLIP ``llm2clip/eva_clip/factory.py`` (commit
cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a) renames ``text.logit_scale`` to ``logit_scale`` and then
deletes only the keys containing ``text`` or ``visual.head``, so ``CustomCLIP.logit_scale`` (created at
ln(1/0.07)) is overwritten by the checkpoint's value. CLIP-trained towers sit at or near the clamp,
ln(100) = 4.605; restarting at ln(1/0.07) = 2.659 with the recipe's lr of 1e-5 leaves training at a
temperature near 1/15 instead of 1/100 for the whole run (Adam moves a scalar by about lr per step).

Every pretrained start therefore keeps the source's value by default (``--logit-scale-init pretrained``)
where the source holds one for the run's loss: a CLIP ``logit_scale`` for the CLIP loss, a SigLIP pair
(``logit_scale`` and ``logit_bias``) for the SigLIP loss; a source without one (a vision-only folder,
a bare tower checkpoint), or of the other loss's family, starts from the new model's values, and the
conversion or run says so. ``--logit-scale-init new`` always starts from the new model's values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

LOGIT_SCALE_INITS = ("pretrained", "new")
NEW_CLIP_LOGIT_SCALE = math.log(1 / 0.07)
# The keys a source may hold them under: OpenCLIP, transformers CLIP/SigLIP and EVA-CLIP use the bare
# names; older EVA-CLIP files keep the scale inside the text tower (load_checkpoint moves it).
SCALE_KEYS = ("logit_scale", "text.logit_scale")
BIAS_KEYS = ("logit_bias", "text.logit_bias")


@dataclass(frozen=True)
class PretrainedLogitParams:
    """What a source offers: the source keys holding the scale (and bias) to copy, or none and why."""

    scale_key: str | None
    bias_key: str | None
    why_not: str | None = None

    @property
    def found(self) -> bool:
        return self.scale_key is not None

    def plan(self) -> dict[str, str]:
        """``{source key: our key}`` for a strict conversion plan."""
        if not self.found:
            return {}
        plan = {self.scale_key: "logit_scale"}
        if self.bias_key is not None:
            plan[self.bias_key] = "logit_bias"
        return plan


def _first(tensors: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in tensors), None)


def _scalar(tensor: torch.Tensor) -> bool:
    return tensor.numel() == 1 and tensor.dim() <= 1 and tensor.is_floating_point()


def find_pretrained_logit_params(tensors: Mapping[str, torch.Tensor], loss: str, init: str = "pretrained",
                                 where: str = "the source") -> PretrainedLogitParams:
    """The logit parameters of ``tensors`` that a model trained with ``loss`` ("clip" or "siglip") keeps
    under ``init`` (see the module docstring). ValueError for an unknown ``init`` or a non-scalar or
    non-finite value (a damaged file must not become a model silently)."""
    if init not in LOGIT_SCALE_INITS:
        raise ValueError(f"--logit-scale-init must be one of {LOGIT_SCALE_INITS}, got {init!r}")
    if init == "new":
        return PretrainedLogitParams(None, None, "--logit-scale-init new")
    scale_key, bias_key = _first(tensors, SCALE_KEYS), _first(tensors, BIAS_KEYS)
    if scale_key is None:
        return PretrainedLogitParams(None, None, f"{where} holds no logit_scale")
    for key in (scale_key, bias_key):
        if key is not None and not (_scalar(tensors[key]) and bool(torch.isfinite(tensors[key]).all())):
            raise ValueError(f"{where}: {key} must be one finite float, got shape "
                             f"{tuple(tensors[key].shape)} dtype {tensors[key].dtype}")
    family = "siglip" if bias_key is not None else "clip"
    if family != loss:
        held = "a logit_scale and a logit_bias" if bias_key else "a logit_scale, no logit_bias"
        why = f"{where}'s logit parameters ({held}) are {family.upper()}'s; the model's loss is {loss}"
        return PretrainedLogitParams(None, None, why)
    return PretrainedLogitParams(scale_key, bias_key if loss == "siglip" else None)


def describe(params: PretrainedLogitParams, tensors: Mapping[str, torch.Tensor], where: str) -> str:
    """One line for the log and ``conversion.json``: where the logit scale starts and why."""
    if params.found:
        value = float(tensors[params.scale_key].float().reshape(()))
        text = (f"logit scale kept from {where}'s {params.scale_key}: {value:.4f} "
                f"(temperature 1/{math.exp(value):.1f})")
        if params.bias_key is not None:
            text += f", logit bias {float(tensors[params.bias_key].float().reshape(())):.4f}"
        return text
    return f"logit scale starts new ({params.why_not})"


def scalar_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` reshaped and cast to ``like``'s shape and dtype (sources store 0-d or (1,) scalars)."""
    return value.detach().reshape(like.shape).to(like.dtype)
