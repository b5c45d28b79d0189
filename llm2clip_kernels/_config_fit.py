"""Which autotune configs fit a GPU's shared memory, per operand dtype.

A Triton GEMM-like kernel with ``num_stages`` software-pipelined stages keeps one copy of each operand
tile per stage in shared memory; a config whose copies do not fit fails to launch (the autotuner then
skips it, but only after compiling and trying it on the first call of every shape). fp32 operands need
twice the bytes of bf16/fp16 ones, so a config list that fits for bf16 can overflow for fp32: each
autotuned kernel keeps a :class:`TileConfigs` (a 16-bit and an fp32 list) whose ``prune`` picks the
operands' list and drops what exceeds the device's shared memory, before anything is benchmarked.

The estimate is ``num_stages * sum(operand tile elements) * element size``; it bounds what Triton 3.9
allocates for these kernels on sm_90a (``python -m llm2clip_fast.kernels._ptxas_report`` prints both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# sm_90 (H100/H200): 227 KiB of shared memory per block with the opt-in carve-out.
SM90_SHARED_MEMORY_BYTES = 227 * 1024

# Operand tiles each kernel pipelines through shared memory, as (rows, cols) config keys. (The loss
# kernels are epilogues over cuBLAS results, with no operand tiles to pipeline.)
_MK_KN = (("BLOCK_M", "BLOCK_K"), ("BLOCK_K", "BLOCK_N"))
OPERAND_TILES: dict[str, tuple[tuple[str, str], ...]] = {
    "adapter_fwd": _MK_KN,
    "adapter_bwd": _MK_KN + _MK_KN,  # LN(x) @ W1 and dy @ W2 share the K loop
    "adapter_wgrad": (("BLOCK_N", "BLOCK_M"), ("BLOCK_M", "BLOCK_K")),
}


def estimated_shared_bytes(kernel: str, config: Any, elem_size: int) -> int:
    """Shared memory (bytes) of ``config`` (a ``triton.Config``) for ``kernel``'s operand tiles."""
    if kernel not in OPERAND_TILES:
        raise KeyError(f"kernel must be one of {sorted(OPERAND_TILES)}, got {kernel!r}")
    kw = config.kwargs
    per_stage = sum(kw[rows] * kw[cols] for rows, cols in OPERAND_TILES[kernel])
    return max(1, config.num_stages) * per_stage * elem_size


def _budget(named_args: dict[str, Any], operand_args: Sequence[str]) -> int:
    import torch

    for name in operand_args:
        t = named_args.get(name)
        if isinstance(t, torch.Tensor) and t.is_cuda:
            props = torch.cuda.get_device_properties(t.device)
            return int(getattr(props, "shared_memory_per_block_optin", SM90_SHARED_MEMORY_BYTES))
    return SM90_SHARED_MEMORY_BYTES


def fitting_configs(kernel: str, configs: Sequence[Any], elem_size: int, budget: int) -> list[Any]:
    """The configs whose operand tiles fit ``budget`` bytes; the smallest one if none does."""
    fits = [c for c in configs if estimated_shared_bytes(kernel, c, elem_size) <= budget]
    return fits or [min(configs, key=lambda c: estimated_shared_bytes(kernel, c, elem_size))]


def _operand_elem_size(named_args: dict[str, Any], operand_args: Sequence[str]) -> int:
    sizes = [named_args[a].element_size() for a in operand_args if hasattr(named_args.get(a), "element_size")]
    return max(sizes) if sizes else 4


def _identity(config: Any) -> tuple:
    # By value: the autotuner may hold copies, and older Triton Configs compare by object identity.
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


@dataclass(frozen=True)
class TileConfigs:
    """The sm_90 autotune configs of one kernel: one list for 16-bit operands, one for fp32.

    fp32 tiles take twice the shared memory and, with full-precision dots (FMA, not tensor cores),
    far more registers: the 16-bit lists spill or overflow there, so fp32 gets its own list.
    """

    kernel: str  # a key of OPERAND_TILES
    operand_args: tuple[str, ...]  # tensor arguments whose tiles are pipelined
    half: tuple[Any, ...]
    fp32: tuple[Any, ...]

    def __post_init__(self) -> None:
        if self.kernel not in OPERAND_TILES:
            raise KeyError(f"kernel must be one of {sorted(OPERAND_TILES)}, got {self.kernel!r}")
        if not self.half or not self.fp32:
            raise ValueError(f"{self.kernel}: both config lists must be non-empty")

    def all(self) -> list[Any]:
        """Every config, each once: what ``triton.autotune`` is given."""
        return list({_identity(c): c for c in (*self.half, *self.fp32)}.values())

    def for_elem_size(self, elem_size: int, budget: int = SM90_SHARED_MEMORY_BYTES) -> list[Any]:
        """The configs worth benchmarking for operands of ``elem_size`` bytes under ``budget``."""
        listed = self.fp32 if elem_size >= 4 else self.half
        return fitting_configs(self.kernel, listed, elem_size, budget)

    def block_min(self, name: str) -> int:
        """Smallest value of config key ``name`` over every config (sizes buffers for all of them)."""
        return min(c.kwargs[name] for c in self.all())

    def block_max(self, name: str) -> int:
        return max(c.kwargs[name] for c in self.all())

    def prune(self, configs: Sequence[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        """``early_config_prune`` for ``triton.autotune``: the dtype's list, minus what overflows."""
        wanted = self.for_elem_size(_operand_elem_size(named_args, self.operand_args),
                                    _budget(named_args, self.operand_args))
        wanted_ids = {_identity(c) for c in wanted}
        kept = [c for c in configs if _identity(c) in wanted_ids]
        return kept or list(configs[:1])

    def autotune_args(self, interpreter: bool, interpreter_config: Any) -> dict[str, Any]:
        """``configs`` and ``prune_configs_by`` for ``triton.autotune``; one config under the interpreter."""
        if interpreter:
            return {"configs": [interpreter_config]}
        return {"configs": self.all(), "prune_configs_by": {"early_config_prune": self.prune}}


def gemm_configs(rows: Sequence[tuple[int, int, int, int, int]], names: tuple[str, str, str] = (
        "BLOCK_M", "BLOCK_N", "BLOCK_K"), **extra: Any) -> tuple[Any, ...]:
    """``triton.Config`` objects from (block0, block1, block2, num_warps, num_stages) rows."""
    import triton

    return tuple(triton.Config({names[0]: a, names[1]: b, names[2]: c, **extra}, num_warps=w, num_stages=st)
                 for a, b, c, w, st in rows)
