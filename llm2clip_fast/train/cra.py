"""Caption retrieval accuracy (CRA) of a text encoder on (short, long) caption pairs.

LLM2CLIP's stage-1 metric: every short caption queries the set of long captions, and a hit is its
own long caption ranked first (top-1, cosine similarity). Ties are scored by their expectation
(see :mod:`llm2clip_fast.eval.retrieval_metrics`), so a collapsed encoder scores ``1/N``, not 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.caption_source import CaptionSource
from ..eval.retrieval_metrics import caption_retrieval_accuracy


def caption_pairs(source: CaptionSource, short: str, long: str, *,
                  limit: int | None = None) -> list[tuple[str, str]]:
    """(short, long) caption pairs of ``source`` in source order (bad samples skipped), at most ``limit``."""
    for name in (short, long):
        if name not in source.caption_names:
            raise ValueError(f"caption field {name!r} not in the source's captions {source.caption_names}")
    pairs = []
    for _, captions in source.iter_captions():
        pairs.append((captions[short], captions[long]))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def encoder_cra(encoder: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32) -> float:
    """CRA in [0, 1] of ``encoder`` (anything with ``encode(texts, batch_size=, show_progress=)``
    returning (N, D) embeddings) on at least two (short, long) pairs."""
    if len(pairs) < 2:
        raise ValueError(f"CRA needs at least 2 caption pairs, got {len(pairs)}")
    shorts = encoder.encode([s for s, _ in pairs], batch_size=batch_size, show_progress=False)
    longs = encoder.encode([t for _, t in pairs], batch_size=batch_size, show_progress=False)
    return caption_retrieval_accuracy(shorts, longs)
