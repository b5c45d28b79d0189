"""Input checks shared by the local and the global-batch (distributed) CLIP and SigLIP losses.

Each check raises TypeError/ValueError naming the argument and what was expected; the scale and bias
checks return 0-dim tensors on the features' device with the autograd graph kept. On CUDA, and on any
device under ``torch.compile`` (a value read on the host would break the graph), the value checks are
asynchronous assertions (no host sync) that raise RuntimeError instead of ValueError.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def check_features(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype (float32, float16, bfloat16, float64), "
                        f"got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch, got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have a non-empty feature dimension, got shape {tuple(t.shape)}")
    return t


def check_pair(image: Tensor, text: Tensor, image_name: str, text_name: str,
                same_batch: bool) -> None:
    check_features(image_name, image)
    check_features(text_name, text)
    if image.device != text.device:
        raise ValueError(f"{image_name} is on {image.device} but {text_name} is on {text.device}; "
                         "put both on one device")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"{image_name} and {text_name} must have the same feature dimension D, got "
                         f"{image.shape[1]} and {text.shape[1]}")
    if same_batch and image.shape[0] != text.shape[0]:
        raise ValueError(f"{image_name} and {text_name} must have the same batch size B, got "
                         f"{image.shape[0]} and {text.shape[0]}")


def _check_scalar(name: str, value: Any, device: torch.device, positive: bool) -> Tensor:
    """``value`` as a 0-dim tensor on ``device`` (graph kept), after type/shape/value checks.

    The value check (finite, and > 0 when ``positive``) reads the value on CPU; on CUDA it is an
    asynchronous device assertion (no host sync), so a bad value surfaces at the next sync.
    """
    wanted = "positive and finite" if positive else "finite"
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        kind = "a positive float" if positive else "a float"
        raise TypeError(f"{name} must be {kind} or a 0-dim floating tensor, got {type(value).__name__}")

    def ok(v: float) -> bool:
        return math.isfinite(v) and (v > 0 or not positive)

    if not isinstance(value, Tensor):
        number = float(value)
        if not ok(number):
            raise ValueError(f"{name} must be {wanted}, got {number}")
        return torch.tensor(number, device=device, dtype=torch.float32)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    if value.device != device:
        if value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {device}")
        value = value.to(device)  # a CPU scalar with device features, as torch allows
    scalar = value.reshape(())
    if scalar.device.type == "cuda" or torch.compiler.is_compiling():
        good = torch.isfinite(scalar) & (scalar > 0) if positive else torch.isfinite(scalar)
        torch._assert_async(good, f"{name} must be {wanted}")
    elif not ok(float(scalar.detach())):
        raise ValueError(f"{name} must be {wanted}, got {float(scalar.detach())}")
    return scalar


def check_scale(logit_scale: Any, device: torch.device) -> Tensor:
    """logit_scale as a 0-dim tensor on ``device`` (graph kept): positive and finite."""
    return _check_scalar("logit_scale", logit_scale, device, positive=True)


def check_bias(logit_bias: Any, device: torch.device) -> Tensor:
    """logit_bias as a 0-dim tensor on ``device`` (graph kept): any finite value."""
    return _check_scalar("logit_bias", logit_bias, device, positive=False)
