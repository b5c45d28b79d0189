"""A tiny OpenCLIP vision tower with non-default weights: what the OpenCLIP converter tests and the tests
that build an OpenCLIP state dict share."""

from __future__ import annotations

import torch
from _open_clip_reference import build_vision_tower

# 4 heads of width 8 (not OpenCLIP's default head width 64), an MLP ratio that is not 4.
VISION_CFG = {"image_size": 16, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8, "mlp_ratio": 1.5}
EMBED_DIM = 12


def _tower(quick_gelu: bool, seed: int = 0, vision_cfg: dict | None = None):
    """An OpenCLIP ViT (eval) with non-default LayerNorm affines and biases, so a swapped or skipped
    tensor shows in the outputs."""
    torch.manual_seed(seed)
    visual = build_vision_tower(EMBED_DIM, vision_cfg or VISION_CFG, quick_gelu=quick_gelu).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return visual
