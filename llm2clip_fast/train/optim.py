"""Optimizer pieces shared by both trainers: AdamW parameter groups, lr schedules, layer-wise lr decay.

- :func:`adamw_param_groups` splits parameters into decay / no-decay groups (biases, norms, 1-d
  tensors and the logit scale/bias get no weight decay, as in OpenCLIP) and, optionally, per-parameter
  lr multipliers (layer-wise lr decay), each multiplier its own group.
- :class:`WarmupSchedule` is a picklable-free callable for ``LambdaLR``: linear warmup then cosine,
  linear or constant. Its attributes go into ``LambdaLR.state_dict()``, so a resumed scheduler is exact.
- :func:`clip_grad_norm`: gradient clipping that returns the pre-clip norm as a float.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")

_NO_DECAY_PATTERN = re.compile(
    r"(^|\.)(bias|logit_scale|logit_bias)$|norm|(^|\.|_)ln(_|\d|\.|$)",
    re.IGNORECASE,
)


def is_no_decay(name: str, param: torch.Tensor, no_decay_names: Collection[str] = ()) -> bool:
    """True for parameters that must not be weight-decayed: 1-d tensors, biases, norms, logit scale/bias,
    and the names a model lists itself (``no_decay_names``: e.g. a timm tower's token and position
    tables, which timm's ``no_weight_decay()`` names; matched exactly, never by pattern, so a
    transformers tower's ``embeddings.cls_token`` keeps the decay it always had)."""
    return param.ndim < 2 or name in no_decay_names or bool(_NO_DECAY_PATTERN.search(name))


def adamw_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    *,
    lr: float,
    lr_multipliers: Mapping[str, float] | Callable[[str], float] | None = None,
    no_decay_names: Collection[str] = (),
) -> list[dict[str, Any]]:
    """AdamW parameter groups for ``torch.optim.AdamW(groups)``.

    named_parameters: ``model.named_parameters()``; frozen parameters (requires_grad False) are
    skipped. weight_decay: applied to matrices only (see :func:`is_no_decay`). lr: base lr.
    lr_multipliers: per-name lr factor (a mapping, missing names 1.0, or a function of the name).
    no_decay_names: exact parameter names kept out of weight decay besides :func:`is_no_decay`'s rule.
    Each group carries ``lr = lr * multiplier`` plus ``lr_scale`` and ``weight_decay`` for logging.
    Groups are ordered deterministically (by first appearance), so optimizer state dicts line up on
    resume.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if lr_multipliers is None:
            mult = 1.0
        elif callable(lr_multipliers):
            mult = float(lr_multipliers(name))
        else:
            mult = float(lr_multipliers.get(name, 1.0))
        no_decay = is_no_decay(name, param, no_decay_names)
        key = (mult, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "lr": lr * mult, "lr_scale": mult,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters (every parameter has requires_grad=False)")
    return list(groups.values())


class WarmupSchedule:
    """lr factor for step ``s``: linear warmup over ``warmup_steps``, then cosine/linear decay or constant.

    Warmup starts at ``1/warmup_steps`` (not 0, so the first step trains) and reaches 1.0 at step
    ``warmup_steps - 1``. Decay runs from ``warmup_steps`` to ``total_steps`` down to
    ``min_lr_ratio``; steps past the end stay at ``min_lr_ratio``. A plain class (not a closure) so
    ``LambdaLR.state_dict()`` stores its attributes.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with one :class:`WarmupSchedule` per group (resumable via ``state_dict``)."""
    schedule = WarmupSchedule(kind, warmup_steps, total_steps, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (None or <= 0: only measure it).

    Returns the norm before clipping, as a float.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        norms = torch.stack([p.grad.detach().float().norm() for p in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
