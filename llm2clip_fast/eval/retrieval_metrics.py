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


def multi_positive_hit_rates(similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int],
                             tie_tolerance: float = TIE_TOLERANCE) -> dict[int, float]:
    """Fraction of queries with at least one positive in their top ``K``, for every ``K`` in ``ks``.

    similarity: (Q, G) scores, higher is better. positives: (Q, G) bool, every row with at least one
    True (e.g. the five captions of an image). Ties follow the module rule: let ``s`` be the negatives
    beating the best positive and ``n``/``p`` the negatives/positives tied with it; in a random order of
    that tie group the first positive is within the first ``j = K - s`` places with probability
    ``1 - C(n, j) / C(n + p, j)`` (zero for ``j <= 0``, one for ``j > n``). With one positive this is
    ``j / (n + 1)``, :func:`topk_hit_rates`' rule. Returns ``{K: rate in [0, 1]}``.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be 2-D (Q, G), got shape {tuple(similarity.shape)}")
    if positives.shape != similarity.shape or positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool tensor of shape {tuple(similarity.shape)}, got "
                         f"{positives.dtype} {tuple(positives.shape)}")
    if similarity.shape[0] and not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive in the gallery")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance!r}")
    sim = similarity.float()
    best = sim.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    beaten_by = ((sim > best + tie_tolerance) & ~positives).sum(dim=1).double()
    tied = (sim - best).abs() <= tie_tolerance
    n = (tied & ~positives).sum(dim=1).double()
    p = (tied & positives).sum(dim=1).double()
    out = {}
    for k in ks:
        j = k - beaten_by
        jc = j.clamp(0, None).minimum(n)
        # log C(n, j) - log C(n + p, j), for j <= n
        log_ratio = (torch.lgamma(n + 1) - torch.lgamma(n - jc + 1)
                     - torch.lgamma(n + p + 1) + torch.lgamma(n + p - jc + 1))
        hit = 1 - log_ratio.exp()
        hit = torch.where(j <= 0, torch.zeros_like(hit), torch.where(j > n, torch.ones_like(hit), hit))
        out[k] = hit.mean().item()
    return out


def multi_caption_retrieval(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                            text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                            chunk: int = 1024) -> dict[str, float]:
    """Image->text and text->image recall@K when an image has several captions (Flickr30k, COCO).

    image_embeddings: (N, D); text_embeddings: (M, D); text_to_image: (M,) int64, the image of each
    caption (every image needs at least one). Image->text: an image is a hit at K when any of its
    captions is in its top K (:func:`multi_positive_hit_rates`); text->image: every caption is a
    query with its one image as the positive. Queries run ``chunk`` rows at a time so no (N, M)
    matrix is held (COCO's 5k x 25k would be 500 MB). Returns ``{"i2t_R@K", "t2i_R@K"}`` fractions.
    """
    _check_embeddings("image_embeddings", image_embeddings)
    _check_embeddings("text_embeddings", text_embeddings)
    n_img, n_txt = image_embeddings.shape[0], text_embeddings.shape[0]
    if text_to_image.shape != (n_txt,) or text_to_image.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"text_to_image must be an integer tensor of shape ({n_txt},), got "
                         f"{text_to_image.dtype} {tuple(text_to_image.shape)}")
    text_to_image = text_to_image.long()
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img:
        raise ValueError(f"text_to_image must index the {n_img} images")
    if torch.bincount(text_to_image, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption")
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"image embeddings have dimension {image_embeddings.shape[1]} but text embeddings "
                         f"have {text_embeddings.shape[1]}")
    img = F.normalize(image_embeddings.float(), dim=-1)
    txt = F.normalize(text_embeddings.float(), dim=-1)
    ks = [int(k) for k in ks]
    i2t = {k: 0.0 for k in ks}
    for start in range(0, n_img, chunk):
        rows = torch.arange(start, min(start + chunk, n_img))
        sim = img[rows] @ txt.t()
        rates = multi_positive_hit_rates(sim, text_to_image[None, :] == rows[:, None], ks)
        for k in ks:
            i2t[k] += rates[k] * len(rows)
    t2i = {k: 0.0 for k in ks}
    for start in range(0, n_txt, chunk):
        stop = min(start + chunk, n_txt)
        rates = topk_hit_rates(txt[start:stop] @ img.t(), text_to_image[start:stop], ks)
        for k in ks:
            t2i[k] += rates[k] * (stop - start)
    out = {f"i2t_R@{k}": i2t[k] / n_img for k in ks}
    out.update({f"t2i_R@{k}": t2i[k] / n_txt for k in ks})
    return out


def topk_accuracy(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor,
                  ks: Sequence[int] = (1, 5), chunk: int = 4096) -> dict[int, float]:
    """Zero-shot top-K accuracy: (N, D) images against (C, D) class embeddings, labels (N,) int64.

    Ties follow the module rule. Returns ``{K: accuracy in [0, 1]}``.
    """
    _check_embeddings("image_embeddings", image_embeddings)
    _check_embeddings("class_embeddings", class_embeddings)
    n = image_embeddings.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    total = {int(k): 0.0 for k in ks}
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim = cosine_similarity_matrix(image_embeddings[start:stop], class_embeddings)
        for k, v in topk_hit_rates(sim, labels[start:stop].long(), ks).items():
            total[k] += v * (stop - start)
    return {k: v / n for k, v in total.items()}
