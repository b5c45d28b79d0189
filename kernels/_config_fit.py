"""Which autotune configs fit a GPU's shared memory, per operand dtype.

A Triton GEMM-like kernel with ``num_stages`` software-pipelined stages keeps one copy of each operand
tile per stage in shared memory; a config whose copies do not fit fails to launch (the autotuner then
skips it, but only after compiling and trying it on the first call of every shape). fp32 operands need
twice the bytes of bf16/fp16 ones, so a config list that fits for bf16 can overflow for fp32: the
autotuners prune with :func:`shared_memory_pruner` before benchmarking.

The estimate is ``num_stages * sum(operand tile elements) * element size``; it bounds what Triton 3.9
allocates for these kernels on sm_90a (``python -m llm2clip_fast.kernels._ptxas_report`` prints both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# sm_90 (H100/H200): 227 KiB of shared memory per block with the opt-in carve-out.
SM90_SHARED_MEMORY_BYTES = 227 * 1024

# Operand tiles each kernel pipelines through shared memory, as (rows, cols) config keys.
_MN_K = (("BLOCK_M", "BLOCK_K"), ("BLOCK_N", "BLOCK_K"))
_MK_KN = (("BLOCK_M", "BLOCK_K"), ("BLOCK_K", "BLOCK_N"))
OPERAND_TILES: dict[str, tuple[tuple[str, str], ...]] = {
    "clip_fwd": _MN_K,
    "clip_bwd": _MN_K,
    "siglip_fwd": _MN_K,
    "siglip_bwd": _MN_K,
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


def shared_memory_pruner(kernel: str, operand_args: Sequence[str]) -> Callable[..., list[Any]]:
    """An ``early_config_prune`` for ``triton.autotune``: drops configs over the device's shared memory.

    ``operand_args``: the kernel's tensor arguments whose tiles are pipelined; the largest element
    size among them sizes the tiles (fp32 activations with bf16 weights still stage fp32 tiles).
    """
    if kernel not in OPERAND_TILES:
        raise KeyError(f"kernel must be one of {sorted(OPERAND_TILES)}, got {kernel!r}")

    def prune(configs: Sequence[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        sizes = [named_args[a].element_size() for a in operand_args if hasattr(named_args.get(a), "element_size")]
        elem = max(sizes) if sizes else 4
        return fitting_configs(kernel, configs, elem, _budget(named_args, operand_args))

    return prune
