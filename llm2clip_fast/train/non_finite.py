"""A training step's non-finite values: the error that stops a run before the update is kept, and the
check of the weights after an optimizer step. The one training loop (:mod:`.training_loop`) uses both
for stage 1, its MNTP phase and stage 2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed as dist_helpers


class NonFiniteTrainingError(FloatingPointError):
    """A training step produced a non-finite loss, gradient or weight; nothing of that step was saved
    (exit code 8)."""


def all_params_finite(params: list[nn.Parameter]) -> bool:
    """Whether every parameter is finite: one device sync for all of them. A sharded (FSDP2 DTensor)
    parameter is checked by each rank on its shard, and the ranks then agree (one tiny all-reduce)."""
    local = [p.detach() for p in params]
    sharded = any(hasattr(t, "to_local") for t in local)
    local = [t.to_local() if hasattr(t, "to_local") else t for t in local]
    local = [t for t in local if t.numel()]
    # The largest magnitude of each tensor is finite exactly when all its entries are (and cannot
    # overflow the way a 2-norm of large finite weights would).
    ok = (torch.stack(torch._foreach_norm(local, math.inf)).isfinite().all() if local
          else torch.tensor(True, device=params[0].device if params else "cpu"))
    if sharded and dist_helpers.get_world_size() > 1:
        import torch.distributed as dist

        flag = ok.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(ok)
