"""One rank of the 2-process hard-negative loss test (tests/test_stage1_recipe.py runs :func:`rank_results`
on gloo ranks with ``_ranks.run_on_ranks``).

Every rank builds the same global batch from a fixed seed, keeps its rows, runs
``hard_negative_nll_loss`` and returns its loss and the gradients of its local rows.
"""

from __future__ import annotations

import torch


def global_batch(world: int, per_rank: int, negatives_per_rank: int, d: int = 6):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(world * per_rank, d, generator=g, dtype=torch.float64)
    p = q + 0.7 * torch.randn(world * per_rank, d, generator=g, dtype=torch.float64)
    n = torch.randn(world * negatives_per_rank, d, generator=g, dtype=torch.float64)
    return q, p, n


def rank_results(rank: int, world: int) -> dict:
    """{"loss": this rank's loss, "grads": the gradients of its q, p, n rows}; the process group is up."""
    from llm2clip_fast.train.hard_negative_loss import hard_negative_nll_loss

    q, p, n = global_batch(world, 3, 2)
    local = [t[rank * (len(t) // world):(rank + 1) * (len(t) // world)].clone().requires_grad_(True)
             for t in (q, p, n)]
    loss = hard_negative_nll_loss(*local, scale=5.0)
    loss.backward()
    return {"loss": loss.detach(), "grads": [t.grad for t in local]}
