"""llm2vec's supervised-contrastive loss with hard negatives (``HardNegativeNLLLoss``), for stage 1.

llm2vec 0.2.3 (``llm2vec/loss/HardNegativeNLLLoss.py``): every query of the global batch is scored
against every positive and then every hard negative of the global batch by cosine similarity times
``scale``; the target of query ``i`` is positive ``i``; the loss is the mean cross-entropy. LLM2CLIP's
stage 1 uses it with scale 50. Here each rank scores its own queries against the gathered positives
and negatives and returns the mean over its rows, the convention of the other stage-1 losses:
averaging the gradients over ranks gives the gradient of llm2vec's global-batch loss, and averaging
the values gives its value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as dist_helpers


def hard_negative_nll_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    scale: torch.Tensor | float = 50.0,
) -> torch.Tensor:
    """Mean over this rank's queries of ``-log softmax(scale * cos(q_i, [P; N]))[offset + i]``.

    Args:
        query: (B, H) query embeddings (any float dtype; computed in fp32).
        positive: (B, H) the positive of each query, row for row.
        negative: (M, H) hard negatives (any number, e.g. one per query) or None.
        scale: the logit scale (llm2vec's ``scale``; LLM2CLIP uses 50).

    Under torch.distributed, ``P`` and ``N`` are all ranks' positives and negatives (rank order) and
    ``offset`` is this rank's first row. Returns a scalar fp32 tensor.
    """
    if query.dim() != 2 or positive.shape != query.shape:
        raise ValueError(f"query and positive must both be (B, H); got {tuple(query.shape)} and "
                         f"{tuple(positive.shape)}")
    if negative is not None and (negative.dim() != 2 or negative.shape[1] != query.shape[1]):
        raise ValueError(f"negative must be (M, {query.shape[1]}), got {tuple(negative.shape)}")
    q = F.normalize(query.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1)
    n = F.normalize(negative.float(), dim=-1) if negative is not None else p[:0]
    offset = 0
    if dist_helpers.get_world_size() > 1:
        p, offset = dist_helpers.gather_rows_with_grad(p, equal_sizes_for="the hard-negative loss")
        n, _ = dist_helpers.gather_rows_with_grad(n)
    logits = (q @ torch.cat([p, n], dim=0).t()) * scale
    return F.cross_entropy(logits, offset + torch.arange(q.shape[0], device=q.device))
