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


def check_scale(logit_scale: Any, device: torch.device) -> Tensor:
    """logit_scale as a 0-dim tensor on ``device`` (graph kept), after type/shape/value checks.

    The value check (> 0, finite) reads the value on CPU; on CUDA it is an asynchronous device
    assertion (no host sync), so a bad value surfaces as a device-side assert at the next sync.
    """
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float, Tensor)):
        raise TypeError(f"logit_scale must be a positive float or a 0-dim floating tensor, got "
                        f"{type(logit_scale).__name__}")
    if not isinstance(logit_scale, Tensor):
        value = float(logit_scale)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"logit_scale must be positive and finite, got {value}")
        return torch.tensor(value, device=device, dtype=torch.float32)
    if not logit_scale.dtype.is_floating_point:
        raise TypeError(f"logit_scale must have a floating dtype, got {logit_scale.dtype}")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (one element), got shape {tuple(logit_scale.shape)}")
    if logit_scale.device != device:
        if logit_scale.device.type != "cpu":
            raise ValueError(f"logit_scale is on {logit_scale.device} but the features are on {device}")
        logit_scale = logit_scale.to(device)  # a CPU scalar with device features, as torch allows
    scale = logit_scale.reshape(())
    if scale.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async((scale > 0) & torch.isfinite(scale), "logit_scale must be positive and finite")
    else:
        value = float(scale.detach())
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"logit_scale must be positive and finite, got {value}")
    return scale


def check_bias(logit_bias: Any, device: torch.device) -> Tensor:
    """logit_bias as a 0-dim tensor on ``device`` (graph kept): any finite value."""
    if isinstance(logit_bias, bool) or not isinstance(logit_bias, (int, float, Tensor)):
        raise TypeError(
            f"logit_bias must be a float or a 0-dim floating tensor, got {type(logit_bias).__name__}"
        )
    if not isinstance(logit_bias, Tensor):
        value = float(logit_bias)
        if not math.isfinite(value):
            raise ValueError(f"logit_bias must be finite, got {value}")
        return torch.tensor(value, device=device, dtype=torch.float32)
    if not logit_bias.dtype.is_floating_point:
        raise TypeError(f"logit_bias must have a floating dtype, got {logit_bias.dtype}")
    if logit_bias.numel() != 1:
        raise ValueError(f"logit_bias must be a scalar (one element), got shape {tuple(logit_bias.shape)}")
    if logit_bias.device != device:
        if logit_bias.device.type != "cpu":
            raise ValueError(f"logit_bias is on {logit_bias.device} but the features are on {device}")
        logit_bias = logit_bias.to(device)
    bias = logit_bias.reshape(())
    if bias.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(bias), "logit_bias must be finite")
    elif not math.isfinite(float(bias.detach())):
        raise ValueError(f"logit_bias must be finite, got {float(bias.detach())}")
    return bias
