"""One rank of the 2-process hard-negative loss test (run as a script by tests/test_stage1_recipe.py).

Every rank builds the same global batch from a fixed seed, keeps its rows, runs
``hard_negative_nll_loss`` and saves its loss and the gradients of its local rows.

Usage: python _dist_hardneg_worker.py RANK WORLD_SIZE PORT OUT_FILE
"""

from __future__ import annotations

import os
import sys

import torch


def global_batch(world: int, per_rank: int, negatives_per_rank: int, d: int = 6):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(world * per_rank, d, generator=g, dtype=torch.float64)
    p = q + 0.7 * torch.randn(world * per_rank, d, generator=g, dtype=torch.float64)
    n = torch.randn(world * negatives_per_rank, d, generator=g, dtype=torch.float64)
    return q, p, n


def main() -> None:
    rank, world, port, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    torch.set_num_threads(1)
    from llm2clip_fast import distributed as D
    from llm2clip_fast.train.hard_negative_loss import hard_negative_nll_loss

    assert D.init_distributed_from_env(backend="gloo", timeout_s=60)
    q, p, n = global_batch(world, 3, 2)
    local = [t[rank * (len(t) // world):(rank + 1) * (len(t) // world)].clone().requires_grad_(True)
             for t in (q, p, n)]
    loss = hard_negative_nll_loss(*local, scale=5.0)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [t.grad for t in local]}, out_file)
    D.destroy_distributed()


if __name__ == "__main__":
    main()
