"""One rank of the distributed-loss tests (tests/ops/test_distributed_losses.py runs :func:`rank_results` on
gloo ranks with ``_ranks.run_on_ranks``).

Every rank builds the same global batch from fixed seeds, keeps its shard, runs the global CLIP and
SigLIP losses with a rank-specific upstream gradient and returns loss and gradients for the parent
test to compare with a single-process computation on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_batch(sizes: list[int], d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = torch.nn.functional.normalize(img + 0.8 * noise, dim=-1)
    return img, txt


def upstream(reduction: str, rank: int, n_local: int) -> torch.Tensor:
    if reduction == "none":
        g = torch.Generator().manual_seed(100 + rank)
        return torch.rand(n_local, generator=g, dtype=torch.float64) + 0.5
    return torch.tensor(1.0 + 0.5 * rank, dtype=torch.float64)


def cases(world: int) -> list[dict]:
    """Equal and unequal shards, every reduction (SigLIP: 'mean'/'sum' one-pass, 'none' two-pass), and
    CLIP both keeping its logits (the default budget at these sizes) and recomputing them (a 1-byte
    budget: one-row chunks)."""
    equal = [4] * world
    unequal = [3, 5, 2][:world]
    return [
        {"name": "equal_mean", "sizes": equal, "reduction": "mean", "per_owner_reduce": False,
         "budget": None},
        {"name": "equal_mean_recompute", "sizes": equal, "reduction": "mean", "per_owner_reduce": False,
         "budget": 1},
        {"name": "unequal_none", "sizes": unequal, "reduction": "none", "per_owner_reduce": False,
         "budget": None},
        {"name": "unequal_none_recompute", "sizes": unequal, "reduction": "none", "per_owner_reduce": False,
         "budget": 1},
        {"name": "unequal_sum_per_owner_reduce", "sizes": unequal, "reduction": "sum",
         "per_owner_reduce": True, "budget": None},
    ]


def _refuse_reduce_scatter(*args, **kwargs):
    raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")


def rank_results(rank: int, world: int) -> dict:
    """This rank's losses and gradients for every case, keyed by (case, loss); the process group is up."""
    from llm2clip_fast.losses import ClipLoss
    from llm2clip_fast.ops._chunking import last_path
    from llm2clip_fast.ops.clip_loss import clip_loss
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    results = {}
    real_reduce_scatter = dist.reduce_scatter
    for case in cases(world):
        # Exercise the per-owner fallback taken where gloo lacks reduce_scatter.
        dist.reduce_scatter = _refuse_reduce_scatter if case["per_owner_reduce"] else real_reduce_scatter
        sizes, reduction = case["sizes"], case["reduction"]
        start = sum(sizes[:rank])
        img, txt = global_batch(sizes, 6, seed=11)
        img, txt = img[start:start + sizes[rank]].float(), txt[start:start + sizes[rank]].float()
        up = upstream(reduction, rank, sizes[rank]).float()
        for loss_name in ("clip", "siglip"):
            leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_(),
                      torch.tensor(7.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)]
            budget = case["budget"]
            if loss_name == "clip":
                loss = clip_loss(leaves[0], leaves[1], leaves[2], reduction=reduction, distributed=True,
                                 memory_budget=budget)
                leaves = leaves[:3]
            else:
                loss = siglip_loss(*leaves, reduction=reduction, distributed=True, memory_budget=budget)
            grads = torch.autograd.grad(loss, leaves, up)
            results[(case["name"], loss_name)] = [loss.detach(), *grads]
            results[(case["name"], loss_name, "path")] = last_path(f"{loss_name}_loss")
    dist.reduce_scatter = real_reduce_scatter
    # The module drop-in: OpenCLIP's constructor arguments for a multi-process run.
    sizes = cases(world)[0]["sizes"]
    img, txt = global_batch(sizes, 6, seed=11)
    start = sum(sizes[:rank])
    module = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    results[("module", "clip")] = [module(img[start:start + 4].float(), txt[start:start + 4].float(), 7.0)]
    # OpenCLIP's own ClipLoss(local_loss=True, gather_with_grad=True) (a transcription of 3.3.0) on the
    # same shards, with this rank's upstream gradient, beside ours on both memory paths.
    from _open_clip_loss_reference import ClipLoss as OpenClipLoss

    up = upstream("mean", rank, 4).float()
    shard = (img[start:start + 4].float(), txt[start:start + 4].float())
    theirs = OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    def ours(budget):
        return lambda i, t, s: clip_loss(i, t, s, distributed=True, memory_budget=budget)

    for name, fn in (("open_clip", theirs), ("ours_keep", ours("1GiB")), ("ours_recompute", ours(1))):
        leaves = [shard[0].clone().requires_grad_(), shard[1].clone().requires_grad_(),
                  torch.tensor(7.0, requires_grad=True)]
        loss = fn(*leaves)
        results[("open_clip_check", name)] = [loss.detach(), *torch.autograd.grad(loss, leaves, up)]
    return results
