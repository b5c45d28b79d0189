"""Memory plan of the chunked losses: the memory budget, row-chunk sizes, and which path ran.

The fused losses walk the (M, N) logit matrix in row chunks of C rows (a C x N workspace). Two
paths, chosen per call by the **memory budget**:

- ``keep-logits``: the forward keeps every fp32 logit chunk (M * N * 4 bytes) and the backward reads
  them instead of recomputing: 6 * M * N * D FLOPs, what a plain one-GEMM loss executes. Taken when
  gradients are needed and the kept logits plus one backward chunk fit the budget.
- ``recompute``: the forward keeps only O(M + N) statistics and the backward recomputes each chunk:
  8 * M * N * D FLOPs, O((M + N) * D) memory plus the chunk workspaces.

The budget is, in order: the ``memory_budget`` argument of the loss; the environment variable
``LLM2CLIP_LOSS_MEMORY_BUDGET`` (bytes, or a number with a unit: ``512MiB``, ``8GB``, ``1.5GiB``);
else a quarter of what is free at the call: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable``
of /proc/meminfo on CPU. It also caps the chunk workspaces. Under torch.compile the budget is read
once, while the call is traced, and is a constant of the graph.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch

from ..device_memory import free_memory_bytes

BUDGET_ENV = "LLM2CLIP_LOSS_MEMORY_BUDGET"
KEEP_LOGITS = "keep-logits"
RECOMPUTE = "recompute"
# Share of the free memory the default budget takes.
DEFAULT_BUDGET_FRACTION = 0.25

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def chunk_elements_from_env(name: str) -> int | None:
    """The workspace size in elements that environment variable ``name`` asks for, or None if unset.

    Raises ValueError naming the variable when it is set to anything but a positive integer.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def parse_bytes(value: int | str, name: str) -> int:
    """A byte count from an int or a string such as ``"512MiB"`` or ``"8GB"``; ``name`` is for errors."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be a number of bytes (int) or a string such as '8GiB', "
                        f"got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 bytes, got {value}")
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{name} must be a byte count such as 1073741824, '512MiB' or '8GB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _resolve_budget(device_type: str, device_index: int | None, budget: int | str | None) -> int:
    if budget is not None:
        return parse_bytes(budget, "memory_budget")
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if raw:
        return parse_bytes(raw, BUDGET_ENV)
    return int(DEFAULT_BUDGET_FRACTION * free_memory_bytes(torch.device(device_type, device_index)))


# Dynamo bakes the result into the graph: reading the environment and the free memory cannot be traced.
@torch.compiler.assume_constant_result
def _budget_while_tracing(device_type: str, device_index: int | None, budget: int | str | None) -> int:
    return _resolve_budget(device_type, device_index, budget)


def memory_budget(device: torch.device, budget: int | str | None = None) -> int:
    """The memory budget in bytes for a loss on ``device`` (module docstring: argument, env, default)."""
    if torch.compiler.is_compiling():
        return _budget_while_tracing(device.type, device.index, budget)
    return _resolve_budget(device.type, device.index, budget)


class ChunkPlan(NamedTuple):
    """How one loss call walks its logits: rows per chunk, and whether the forward keeps them."""

    rows: int
    keep_logits: bool
    budget: int

    @property
    def path(self) -> str:
        return KEEP_LOGITS if self.keep_logits else RECOMPUTE


def plan_chunks(m: int, n: int, *, workspace_elements: int, workspace_elem_bytes: int, kept_elem_bytes: int,
                buffers: int, budget: int, min_rows: int = 1, want_keep: bool = False) -> ChunkPlan:
    """Rows per chunk and keep-or-recompute for an (m, n) logit matrix.

    ``workspace_elements``: the preferred C x n workspace size; ``buffers`` workspaces of
    ``workspace_elem_bytes`` per element are alive at once (two per pipeline stage when overlapping),
    and together they stay within ``budget`` (at least ``min_rows`` rows each). ``want_keep``: the
    call needs gradients; the logits are kept when their ``m * n * kept_elem_bytes`` bytes plus
    ``min_rows``-row workspaces fit the budget, and the workspaces then get what the logits leave.
    """
    # sym_min/sym_max: under torch.compile with dynamic shapes, m and n are symbolic and the row count
    # stays a formula of them instead of a guard that recompiles for every batch size.
    n = torch.sym_max(n, 1)
    per_row = buffers * n * workspace_elem_bytes
    kept = m * n * kept_elem_bytes
    keep = bool(want_keep and kept + min_rows * per_row <= budget)
    room = budget - kept if keep else budget
    rows = torch.sym_min(torch.sym_max(1, workspace_elements // n), room // per_row)
    rows = torch.sym_min(torch.sym_max(rows, torch.sym_max(min_rows, 1)), torch.sym_max(m, 1))
    return ChunkPlan(rows, keep, budget)


# Which memory path each loss's latest call took (op name -> KEEP_LOGITS or RECOMPUTE), for benches,
# checks and `python -m llm2clip_fast.info`, next to the backend that ran.
_LAST_PATH: dict[str, str] = {}


def record_path(op_name: str, path: str) -> None:
    _LAST_PATH[op_name] = path


def last_path(op_name: str) -> str | None:
    """The memory path (``keep-logits``, ``recompute`` ...) of ``op_name``'s latest call, or None."""
    return _LAST_PATH.get(op_name)


def clear_paths() -> None:
    _LAST_PATH.clear()
