"""``attn_implementation="xformers"``: transformers 5 attention backed by xformers' memory-efficient kernel.

transformers 5 lets a package register an attention function (``AttentionInterface``) and the mask
builder that feeds it (``AttentionMaskInterface``). :func:`register_xformers_attention` registers
both under ``"xformers"``: masks come as additive float tensors (0 = attend, dtype min = masked; for
a bidirectional model that is the padding mask alone, see :mod:`.bidirectional`), and
:func:`xformers_attention_forward` hands them to ``xformers.ops.memory_efficient_attention`` as its
``attn_bias``. xformers is imported on first use only, so registering costs nothing where it is not
installed; the kernel runs on CUDA only, and anything else raises a clear error.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

NAME = "xformers"


def _check_device(query: torch.Tensor) -> None:
    if query.device.type != "cuda":
        raise ValueError(
            f"attn_implementation='xformers' runs on CUDA only; the model is on {query.device}. "
            "Use attn_implementation='sdpa' there"
        )


def _xformers_ops() -> Any:
    if importlib.util.find_spec("xformers") is None:
        raise ValueError("attn_implementation='xformers' needs the xformers package: pip install xformers")
    return importlib.import_module("xformers.ops")


def _aligned_bias(mask: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """The (B, H, Lq, Lk) bias xformers wants, in the query's dtype, its last dim stored padded to a
    multiple of 8 (the kernel's alignment requirement for a bias)."""
    b, h, lq, lk = shape
    padded = -(-lk // 8) * 8
    storage = torch.empty((b, h, lq, padded), dtype=dtype, device=mask.device)
    bias = storage[..., :lk]
    bias.copy_(mask.to(dtype).expand(b, h, lq, lk))
    return bias


def xformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D), mask None or
    an additive (B, 1, Lq, Lk) float tensor. Returns ((B, Lq, Hq, D), None) like transformers' SDPA path."""
    _check_device(query)
    ops = _xformers_ops()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend (transformers' boolean masks)
            attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        bias: Any = _aligned_bias(attention_mask[:, :, :, :lk], (b, h, lq, lk), query.dtype)
    elif getattr(module, "is_causal", False) and lq > 1:
        bias = ops.LowerTriangularMask()
    else:
        bias = None
    out = ops.memory_efficient_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),  # xformers wants (B, L, H, D)
        attn_bias=bias, p=dropout if module.training else 0.0, scale=scaling,
    )
    return out, None


def register_xformers_attention() -> None:
    """Register ``"xformers"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, xformers_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)
