"""The official LLM2CLIP caption keys as caption names.

The official data (microsoft/LLM2CLIP ``llm2clip/data/extract_embedding.py`` at commit
cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a) keeps each sample's two captions in its JSON member as
``shortSV_captions`` and ``longSV_captions``; the embedding tars it writes name their members the same,
and WebDataset reads those back lower-cased (``shortsv_captions``, as ``training/data.py`` asks for
them). Our names ``short`` and ``long`` (the defaults of ``--caption``, stage 1's ``--short-caption`` /
``--long-caption`` and the stage-2 recipe's mix) find these keys when the data has no caption of that
exact name, so the official shards need no renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

OFFICIAL_CAPTION_KEYS = {"short": "shortSV_captions", "long": "longSV_captions"}


def resolve_caption_name(name: str, available: Sequence[str]) -> str:
    """The caption of ``available`` that ``name`` stands for: itself when present; else, for ``short`` and
    ``long``, the official key (any letter case); else ``name`` unchanged (the caller's check names it)."""
    if name in available:
        return name
    official = OFFICIAL_CAPTION_KEYS.get(name)
    if official is not None:
        matches = [a for a in available if a.lower() == official.lower()]
        if len(matches) == 1:
            return matches[0]
    return name
