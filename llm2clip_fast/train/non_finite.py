"""A training step's non-finite values: the error that stops a run before the update is kept, and the
check of the weights after an optimizer step. Stage 1's contrastive phase and its MNTP phase use both.
"""

from __future__ import annotations

import torch
from torch import nn


class NonFiniteTrainingError(FloatingPointError):
    """A stage-1 step produced a non-finite loss, gradient or weight; nothing of that step was saved."""


def all_params_finite(params: list[nn.Parameter]) -> bool:
    """Whether every parameter is finite: one device sync for all of them (LoRA weights are small)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())
