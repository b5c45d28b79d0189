"""LLM2CLIP's text adapter ("TextProj"): the trained head on top of the frozen LLM's caption embedding.

Architecture (both classes, identical parameter names and shapes, so one state_dict loads into either)::

    x = F.normalize(x, dim=-1)                                 # L2, eps 1e-12
    for block in blocks:                                       # num_blocks residual pre-LN blocks
        x = x + block.fc2(dropout(GELU(block.fc1(block.norm(x)))))
    y = proj(final_norm(x))

``fc1``: Linear(d -> expansion*d), ``fc2``: Linear(expansion*d -> d), exact (erf) GELU as ``nn.GELU()``,
``proj``: Linear(d -> out_dim) with bias, LayerNorm eps 1e-5. Dropout, when > 0, acts on the hidden
activation right after GELU (the only place); it is off in ``eval()``.

:class:`TextAdapter` runs through :func:`llm2clip_fast.ops.adapter.text_adapter`, whose backends (the
lean autograd Functions, eager torch, activation checkpointing) compute the same formula with different
saved state; see that module for which one dispatch picks where.
:class:`TextAdapterReference` is the plain nn.Module formulation: the ground truth for tests and benches.

Input: ``(B, in_dim)`` of any float dtype; it is cast to the parameters' dtype first (as a caller would
do for nn.Linear), and under ``torch.autocast`` the GEMMs run in the autocast dtype like nn.Linear's.

``input_norm`` (both classes): ``"l2"`` (the default) L2-normalises the input as above; ``"none"`` feeds it
unchanged into the first block. The official code has both: ``TextProj.forward(text, l2_norm=True)``
normalises (its default, used when training on cached embeddings), while ``LLM2VecTextTransformer``
calls ``text_proj(x, l2_norm=False)`` (microsoft/LLM2CLIP ``llm2clip/eva_clip/model.py`` and
``llm_model.py``, commit cba3b45ba3d9). The fused kernels fold the L2 step into their first pass, so
``"none"`` always runs the plain-torch formulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import adapter as adapter_ops

L2_EPS = 1e-12
LN_EPS = 1e-5
INPUT_NORMS = ("l2", "none")


class TextAdapterBlock(nn.Module):
    """One residual pre-LN MLP block: ``x + fc2(dropout(GELU(fc1(norm(x)))))``."""

    def __init__(self, dim: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dropout(self.act(self.fc1(self.norm(x)))))


def check_adapter_args(in_dim: int, out_dim: int, num_blocks: int, expansion: int, dropout: float,
                       input_norm: str = "l2") -> None:
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("expansion", expansion)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")


class _TextAdapterLayout(nn.Module):
    """The parameters shared by both formulations (one definition keeps the state_dicts identical)."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int = 4, expansion: int = 2,
                 dropout: float = 0.0, input_norm: str = "l2") -> None:
        super().__init__()
        check_adapter_args(in_dim, out_dim, num_blocks, expansion, dropout, input_norm)
        self.input_norm = input_norm
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_blocks = num_blocks
        self.expansion = expansion
        self.dropout_p = float(dropout)
        self.blocks = nn.ModuleList(TextAdapterBlock(in_dim, expansion, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(in_dim, eps=LN_EPS)
        self.proj = nn.Linear(in_dim, out_dim)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_blocks={self.num_blocks}, "
                f"expansion={self.expansion}, dropout={self.dropout_p}, input_norm={self.input_norm!r}")

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, {self.in_dim}), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (B, {self.in_dim}), got dtype {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"x must have shape (B, {self.in_dim}) (rank 2), got rank {x.dim()} "
                             f"shape {tuple(x.shape)}")
        if x.shape[1] != self.in_dim:
            raise ValueError(f"x must have last dimension in_dim={self.in_dim}, got shape {tuple(x.shape)}")
        return x.to(self.proj.weight.dtype)


class TextAdapterReference(_TextAdapterLayout):
    """Plain nn.Module formulation of the adapter (eager PyTorch, stores every activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) float -> (B, out_dim) in the parameter (or autocast) dtype."""
        x = self._check_input(x)
        if self.input_norm == "l2":
            x = F.normalize(x, dim=-1, eps=L2_EPS)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.final_norm(x))


class TextAdapter(_TextAdapterLayout):
    """The adapter through the ``text_adapter`` op (:mod:`llm2clip_fast.ops.adapter`).

    ``TextAdapter(in_dim, out_dim, num_blocks=4, expansion=2, dropout=0.0, input_norm="l2")``;
    ``forward(x)``: x (B, in_dim) any float dtype -> (B, out_dim). ``backend`` (constructor) forces a
    backend of the op ("triton", "lean", "torch" or "recompute"); None lets dispatch choose.
    """

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int = 4, expansion: int = 2,
                 dropout: float = 0.0, backend: str | None = None, input_norm: str = "l2") -> None:
        super().__init__(in_dim, out_dim, num_blocks, expansion, dropout, input_norm)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) float -> (B, out_dim) in the parameter (or autocast) dtype."""
        x = self._check_input(x)
        block_weights = [(b.norm.weight, b.norm.bias, b.fc1.weight, b.fc1.bias, b.fc2.weight, b.fc2.bias)
                         for b in self.blocks]
        head_weights = (self.final_norm.weight, self.final_norm.bias, self.proj.weight, self.proj.bias)
        return adapter_ops.text_adapter(
            x, block_weights, head_weights, ln_eps=LN_EPS, l2_eps=L2_EPS,
            l2_normalize=self.input_norm == "l2",
            dropout=self.dropout_p, training=self.training, backend=self.backend,
        )

