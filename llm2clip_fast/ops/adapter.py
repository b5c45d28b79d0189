"""The text adapter op: public function, backend choice, autograd around the fused Triton kernels.

``text_adapter(x, block_weights, head_weights)`` computes LLM2CLIP's adapter (see
:mod:`llm2clip_fast.models.text_adapter` for the architecture) with one of two backends:

- ``triton`` (CUDA tensors; CPU tensors only when forced under ``TRITON_INTERPRET=1``): the fused
  kernels of :mod:`llm2clip_fast.kernels.adapter`. Forward per block: one row-statistics kernel, one
  GEMM that LayerNorms its A tile as it loads it and applies bias+GELU in its epilogue, one GEMM with
  bias+residual in its epilogue. The L2 normalisation of the input is folded into the first block's
  LayerNorm statistics and into the first residual add, so the normalised input is never written.
  Saved for backward: the (cast) input, every later block input (B x d, the residual stream), and
  per-row fp32 mean / rstd (and the input's L2 norm): nothing of size B x expansion*d. The backward
  recomputes the LayerNorm output and the pre-GELU activation inside its kernels.
- ``torch``: the same formula with plain torch functions (eager; stores every activation). It serves
  CPU tensors, and dropout > 0 while training: the fused kernels implement no dropout, which shows
  in ``python -m llm2clip_fast.info`` as the op ``text_adapter_dropout``, whose triton backend refuses.

Forcing: ``backend=`` argument, ``LLM2CLIP_BACKEND_TEXT_ADAPTER``, or ``LLM2CLIP_BACKEND``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _backend
from ._backend import Backend, DispatchContext

OP_NAME = "text_adapter"
DROPOUT_OP_NAME = "text_adapter_dropout"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BlockWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
HeadWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def text_adapter_torch(
    x: torch.Tensor,
    block_weights: Sequence[BlockWeights],
    head_weights: HeadWeights,
    *,
    ln_eps: float = 1e-5,
    l2_eps: float = 1e-12,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Plain-torch adapter: the formula of :class:`TextAdapterReference`, functionally."""
    x = F.normalize(x, dim=-1, eps=l2_eps)
    d = x.shape[-1]
    for ln_w, ln_b, w1, b1, w2, b2 in block_weights:
        h = F.gelu(F.linear(F.layer_norm(x, (d,), ln_w, ln_b, ln_eps), w1, b1))
        if dropout > 0.0 and training:
            h = F.dropout(h, dropout, training=True)
        x = x + F.linear(h, w2, b2)
    lnf_w, lnf_b, wp, bp = head_weights
    return F.linear(F.layer_norm(x, (d,), lnf_w, lnf_b, ln_eps), wp, bp)


def _check_weights(x: torch.Tensor, block_weights: Sequence[BlockWeights], head_weights: HeadWeights) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"x must be a floating-point tensor of shape (B, d), got {got}")
    d = x.shape[1]
    for i, bw in enumerate(block_weights):
        if len(bw) != 6:
            raise ValueError(f"block_weights[{i}] must hold 6 tensors (ln_w, ln_b, w1, b1, w2, b2), "
                             f"got {len(bw)}")
        h = bw[2].shape[0]
        expected = {"ln_w": (d,), "ln_b": (d,), "w1": (h, d), "b1": (h,), "w2": (d, h), "b2": (d,)}
        for name, t in zip(expected, bw):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"block_weights[{i}].{name} must have shape {expected[name]} for x of "
                                 f"shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if len(head_weights) != 4:
        raise ValueError(f"head_weights must hold 4 tensors (ln_w, ln_b, w, b), got {len(head_weights)}")
    n = head_weights[2].shape[0]
    expected = {"ln_w": (d,), "ln_b": (d,), "w": (n, d), "b": (n,)}
    for name, t in zip(expected, head_weights):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"head_weights.{name} must have shape {expected[name]} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")


def text_adapter(
    x: torch.Tensor,
    block_weights: Sequence[BlockWeights],
    head_weights: HeadWeights,
    *,
    ln_eps: float = 1e-5,
    l2_eps: float = 1e-12,
    dropout: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """LLM2CLIP text adapter: L2-normalise, residual pre-LN GELU MLP blocks, LayerNorm, projection.

    x: (B, d) float (fp32/fp16/bf16). block_weights: per block ``(ln_w (d,), ln_b (d,), w1 (h, d),
    b1 (h,), w2 (d, h), b2 (d,))``. head_weights: ``(ln_w (d,), ln_b (d,), w (n, d), b (n,))``.
    Returns (B, n) in the autocast dtype under ``torch.autocast``, else in ``x``'s dtype (x must match
    the weights' dtype outside autocast, as for nn.Linear). ``dropout`` acts after each GELU when
    ``training``; the fused backend then steps aside for the torch one.
    """
    _check_weights(x, block_weights, head_weights)
    flat = [t for bw in block_weights for t in bw] + list(head_weights)
    options = {"dropout": float(dropout), "training": bool(training)}
    if dropout > 0.0 and training:
        chosen = _backend.select_backend(DROPOUT_OP_NAME, [x, *flat], backend=backend or
                                         _backend.env_forced_backend(OP_NAME), options=options)
    else:
        chosen = _backend.select_backend(OP_NAME, [x, *flat], backend=backend, options=options)
    return chosen.run(x, block_weights, head_weights, ln_eps=ln_eps, l2_eps=l2_eps,
                      dropout=dropout, training=training)


def _torch_reasons(ctx: DispatchContext) -> list[str]:
    return []


_TORCH = Backend("torch", run=text_adapter_torch, reasons=_torch_reasons,
                 description="plain torch (eager): F.layer_norm / F.linear / F.gelu, stores every activation")


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    d, h, n = 64, 128, 32
    x = torch.randn(8, d, device=device, dtype=dtype)
    block = (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype),
             torch.randn(h, d, device=device, dtype=dtype), torch.zeros(h, device=device, dtype=dtype),
             torch.randn(d, h, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype))
    head = (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype),
            torch.randn(n, d, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=dtype))
    return (x, *block, *head)


_backend.register_op(OP_NAME, [_TORCH], description="LLM2CLIP text adapter (no dropout, or eval)",
                     probe=_probe)
_backend.register_op(DROPOUT_OP_NAME, [_TORCH], probe=_probe,
                     description="LLM2CLIP text adapter while training with dropout > 0")
