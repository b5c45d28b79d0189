"""Matrix products with an fp32 result, shared by the loss backends' gradient GEMMs."""

from __future__ import annotations

import torch

# None: not tried yet. torch.mm(..., out_dtype=float32) multiplies bf16/fp16 with an fp32 result
# (fp32 accumulation, no rounding to the input dtype) on CUDA in recent torch; where it is missing,
# the product is taken in the input dtype and then widened.
_MM_OUT_DTYPE_WORKS: bool | None = None


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result, whatever the operands' float dtype."""
    global _MM_OUT_DTYPE_WORKS
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.device.type == "cuda" and _MM_OUT_DTYPE_WORKS is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):  # this torch build lacks out_dtype
            _MM_OUT_DTYPE_WORKS = False
        else:
            _MM_OUT_DTYPE_WORKS = True
            return out
    return torch.mm(a, b).float()
