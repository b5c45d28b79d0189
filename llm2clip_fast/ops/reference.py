"""Plain-torch formulas: the ground truth for tests and the fallback of last resort.

These materialise whatever the formula needs (the B x B logit matrix for the losses), in fp32.
They follow OpenCLIP's definitions exactly so a drop-in can be checked against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric InfoNCE (OpenCLIP ``ClipLoss``) over the materialised (B, B) logit matrix.

    image_features, text_features: (B, D). logit_scale: scalar multiplier (already exponentiated).
    Per sample i the loss is ``(CE(logits[i], i) + CE(logits.T[i], i)) / 2``; ``reduction`` is
    'mean' (OpenCLIP's value), 'sum' or 'none' (shape (B,)). Computed in fp32.
    """
    img = image_features.float()
    txt = text_features.float()
    scale = torch.as_tensor(logit_scale, device=img.device).float()
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    per_text = F.cross_entropy(logits.t(), labels, reduction="none")
    return _reduce((per_image + per_text) / 2, reduction)


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid loss (OpenCLIP ``SigLipLoss``): sum over all pairs of -logsigmoid(label * logit) / B.

    logits = logit_scale * image @ text.T + logit_bias; label +1 on the diagonal, -1 elsewhere.
    'mean' divides the total by the number of images (OpenCLIP's convention), 'sum' does not,
    'none' returns the per-image row sums (shape (B,)). Computed in fp32.
    """
    img = image_features.float()
    txt = text_features.float()
    scale = torch.as_tensor(logit_scale, device=img.device).float()
    bias = torch.as_tensor(logit_bias, device=img.device).float()
    logits = scale * img @ txt.t() + bias
    n = img.shape[0]
    labels = 2 * torch.eye(n, device=img.device, dtype=logits.dtype) - 1
    per_image = -F.logsigmoid(labels * logits).sum(dim=1)
    return _reduce(per_image, reduction)


def masked_mean_pool_reference(
    hidden_states: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: bool = False,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Mean of ``hidden_states`` (B, L, H) over positions where ``mask`` (B, L) is nonzero, in fp32.

    Rows with an empty mask give zeros. ``normalize`` L2-normalises each pooled row
    (``x / max(||x||, eps)``, as ``F.normalize``). Returns (B, H) fp32.
    """
    h = hidden_states.float()
    m = (mask != 0).to(h.dtype).unsqueeze(-1)
    summed = (h * m).sum(dim=1)
    count = m.sum(dim=1).clamp_min(1.0)
    pooled = summed / count
    if normalize:
        pooled = F.normalize(pooled, dim=-1, eps=eps)
    return pooled
