"""Retrieval metrics as pure functions on embeddings: recall@K, CRA, zero-shot accuracy.

Every metric ranks a gallery by cosine similarity to each query. Ties are scored by their
expectation under a uniformly random tie-break: a positive tied with ``t`` negatives and beaten by
``s`` negatives sits uniformly at rank ``s+1 .. s+t+1``, so it is in the top ``K`` with probability
``clamp((K - s) / (t + 1), 0, 1)``. This neither rewards a collapsed model (identical embeddings
would be a perfect score under an optimistic tie-break) nor punishes a model for inputs that are
genuinely identical (a 77-token text tower on captions that share their first 77 tokens scores
``1/group`` on average, not zero). Scores within ``TIE_TOLERANCE`` of each other are tied: identical
inputs embedded in different batches (different padding, different GEMM blocking) differ by a few
float32 ulps, and such noise must not decide a rank. ``K`` larger than the gallery counts every
positive as found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Cosine similarities lie in [-1, 1]; batch-dependent float32 noise is ~1e-7, real differences between
# distinct inputs are orders of magnitude larger.
TIE_TOLERANCE = 1e-5


def _check_embeddings(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) tensor, got shape {tuple(x.shape)}")


def cosine_similarity_matrix(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(Q, D) x (G, D) -> (Q, G) cosine similarities in fp32 (rows L2-normalised first)."""
    _check_embeddings("queries", queries)
    _check_embeddings("gallery", gallery)
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but gallery has {gallery.shape[1]}")
    q = F.normalize(queries.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1)
    return q @ g.t()


def topk_hit_rates(similarity: torch.Tensor, targets: torch.Tensor, ks: Sequence[int],
                   tie_tolerance: float = TIE_TOLERANCE) -> dict[int, float]:
    """Fraction of queries whose target is among the top ``K`` of their row, for every ``K`` in ``ks``.

    similarity: (Q, G) scores, higher is better. targets: (Q,) int64 index of each query's one
    positive in the gallery. Scores within ``tie_tolerance`` of the positive's are ties, counted by
    the expected rank under a random tie-break (module docstring). Returns ``{K: rate in [0, 1]}``.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be 2-D (Q, G), got shape {tuple(similarity.shape)}")
    q, g = similarity.shape
    if targets.shape != (q,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor of shape ({q},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if q and (int(targets.min()) < 0 or int(targets.max()) >= g):
        raise ValueError(f"targets must index the gallery of size {g}")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    sim = similarity.float()
    positive = sim.gather(1, targets.long()[:, None])
    if not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance!r}")
    beaten_by = (sim > positive + tie_tolerance).sum(dim=1).double()
    # The positive is tied with itself; the rest of the ties are negatives.
    tied_with = ((sim - positive).abs() <= tie_tolerance).sum(dim=1).double() - 1
    return {k: ((k - beaten_by) / (tied_with + 1)).clamp(0, 1).mean().item() for k in ks}


def image_text_retrieval(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                         ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@K for paired embeddings (row i of each is one pair).

    image_embeddings: (N, D), text_embeddings: (N, D), any float dtype. Returns
    ``{"i2t_R@K": ..., "t2i_R@K": ...}`` as fractions in [0, 1].
    """
    _check_embeddings("image_embeddings", image_embeddings)
    _check_embeddings("text_embeddings", text_embeddings)
    if image_embeddings.shape[0] != text_embeddings.shape[0]:
        raise ValueError(f"image_embeddings has {image_embeddings.shape[0]} rows but text_embeddings "
                         f"has {text_embeddings.shape[0]}: they must be paired row by row")
    sim = cosine_similarity_matrix(image_embeddings, text_embeddings)
    targets = torch.arange(sim.shape[0])
    out = {f"i2t_R@{k}": v for k, v in topk_hit_rates(sim, targets, ks).items()}
    out.update({f"t2i_R@{k}": v for k, v in topk_hit_rates(sim.t(), targets, ks).items()})
    return out


def caption_retrieval_accuracy(short_embeddings: torch.Tensor, long_embeddings: torch.Tensor) -> float:
    """CRA: fraction of short captions whose nearest long caption is their own (top-1).

    short_embeddings, long_embeddings: (N, D), row i of both describes the same image.
    """
    _check_embeddings("short_embeddings", short_embeddings)
    _check_embeddings("long_embeddings", long_embeddings)
    if short_embeddings.shape[0] != long_embeddings.shape[0]:
        raise ValueError(f"short_embeddings has {short_embeddings.shape[0]} rows but long_embeddings has "
                         f"{long_embeddings.shape[0]}")
    sim = cosine_similarity_matrix(short_embeddings, long_embeddings)
    return topk_hit_rates(sim, torch.arange(sim.shape[0]), (1,))[1]


def zero_shot_accuracy(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor,
                       labels: torch.Tensor) -> float:
    """Top-1 zero-shot classification accuracy.

    image_embeddings: (N, D); class_embeddings: (C, D), one per class prompt; labels: (N,) int64
    class index of each image.
    """
    _check_embeddings("image_embeddings", image_embeddings)
    _check_embeddings("class_embeddings", class_embeddings)
    if labels.shape != (image_embeddings.shape[0],):
        raise ValueError(f"labels must have shape ({image_embeddings.shape[0]},), got {tuple(labels.shape)}")
    sim = cosine_similarity_matrix(image_embeddings, class_embeddings)
    return topk_hit_rates(sim, labels, (1,))[1]
