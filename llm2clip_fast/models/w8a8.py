"""``W8A8Linear``: an ``nn.Linear`` replaced by 8-bit weights and per-token 8-bit activations.

The weight is quantised once, per output channel (int8, or float8 e4m3 for ``w8a8-fp8``), after an
optional SmoothQuant multiplication of its input columns by ``smooth`` (the activation is divided by the
same factors at run time, inside the quantisation pass); the activation is quantised per row (token)
on every call. The product runs through :func:`llm2clip_fast.ops.w8a8_linear.w8a8_linear`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import w8a8_linear as ops

MODES = {"w8a8-int8": ops.INT8, "w8a8-fp8": ops.FP8}


class W8A8Linear(nn.Module):
    """8-bit replacement of ``linear`` (``mode``: "w8a8-int8" or "w8a8-fp8"); ``smooth``: (in_features,)
    SmoothQuant factors or None. Forward: (..., in_features) float -> (..., out_features), same dtype.

    Buffers: ``weight_q`` (out, in) codes, ``weight_scale`` (out,) fp32, ``inv_smooth`` (in,) fp32 or
    None, ``bias`` (out,) in the linear's dtype or None. On the CPU the oneDNN-packed int8 weight is
    made on the first call and kept (not a buffer: it is rebuilt after a move).
    """

    def __init__(self, linear: nn.Linear, mode: str, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if smooth is not None and tuple(smooth.shape) != (linear.in_features,):
            raise ValueError(f"smooth must have shape ({linear.in_features},), got {tuple(smooth.shape)}")
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        if smooth is not None:
            weight = weight * smooth.float().to(weight.device)[None, :]
        weight_q, weight_scale = ops.quantize_weight(weight, MODES[mode])
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        inv_smooth = None if smooth is None else (1.0 / smooth.float()).to(weight.device)
        self.register_buffer("inv_smooth", inv_smooth)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self._packed: object | None = None

    def _apply(self, fn, recurse=True):
        self._packed = None  # a move or cast invalidates the packed copy
        return super()._apply(fn, recurse)

    def _cpu_packed(self) -> object | None:
        if self._packed is None and self.weight_q.dtype == ops.INT8 and ops._cpu_problem() is None:
            self._packed = ops.prepack_cpu_weight(self.weight_q)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        packed = self._cpu_packed() if x2.device.type == "cpu" else None
        y = ops.w8a8_linear(x2, self.weight_q, self.weight_scale, self.bias, self.inv_smooth, packed=packed)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}, "
                f"smoothed={self.inv_smooth is not None}, bias={self.bias is not None}")
