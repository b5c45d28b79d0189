"""Matrix products with an fp32 result from fp32, bf16 or fp16 operands (the losses' GEMMs).

The fused losses multiply 16-bit features but need fp32 logits and gradients: a logit rounded to
bf16 is off by up to 2^-9 |l|, which at logit scale 100 moves exp(s * l) by up to 20 %.

- CUDA: ``torch.mm`` / ``torch.addmm`` with ``out_dtype=torch.float32`` (torch >= 2.8) run cuBLAS
  with 16-bit operands, fp32 accumulation and an fp32 result, written straight into ``out`` (a row
  slice of a larger buffer is fine). Where this torch lacks them, the product is taken in the input
  dtype and then widened (less precise; said once in the log).
- CPU: ATen has no 16-bit GEMM with an fp32 result, so 16-bit operands are widened to fp32 first;
  products of 16-bit values are exact in fp32, so the result is what cuBLAS computes.
- fp32 and fp64 operands multiply in their own dtype.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_LOW = (torch.bfloat16, torch.float16)
# None: not tried yet; then whether this torch's CUDA build has mm/addmm with out_dtype.
_CUDA_OUT_DTYPE_WORKS: bool | None = None


def _cuda_out_dtype_usable(a: torch.Tensor) -> bool:
    return a.device.type == "cuda" and a.dtype in _LOW and _CUDA_OUT_DTYPE_WORKS is not False


def _note_out_dtype(works: bool) -> None:
    global _CUDA_OUT_DTYPE_WORKS
    if works is False and _CUDA_OUT_DTYPE_WORKS is None:
        logger.warning("torch.mm(..., out_dtype=torch.float32) is missing in torch %s: 16-bit loss GEMMs "
                       "round their results to the input dtype before widening them", torch.__version__)
    _CUDA_OUT_DTYPE_WORKS = works


def _widened(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dtype in _LOW and a.device.type != "cuda":
        return a.float(), b.float()
    return a, b


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (fp64 for fp64 operands). a: (M, K), b: (K, N), same dtype."""
    if _cuda_out_dtype_usable(a):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):  # this torch build lacks out_dtype
            _note_out_dtype(False)
        else:
            _note_out_dtype(True)
            return out
    a, b = _widened(a, b)
    out = torch.mm(a, b)
    return out.float() if out.dtype in _LOW else out


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``a @ b`` into ``out`` (M, N), fp32 (fp64 for fp64 operands), and return ``out``.

    ``out`` may be a row slice of a larger buffer (row stride >= N, unit column stride).
    """
    if _cuda_out_dtype_usable(a):
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, NotImplementedError, TypeError):
            _note_out_dtype(False)
        else:
            _note_out_dtype(True)
            return out
    a, b = _widened(a, b)
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    out.copy_(torch.mm(a, b))
    return out


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """``acc += alpha * a @ b`` in place; acc fp32 (fp64 for fp64 operands). Returns ``acc``."""
    if _cuda_out_dtype_usable(a):
        try:
            torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
        except (RuntimeError, NotImplementedError, TypeError):
            _note_out_dtype(False)
        else:
            _note_out_dtype(True)
            return acc
    a, b = _widened(a, b)
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b, alpha=alpha)
    return acc.add_(torch.mm(a, b), alpha=alpha)
