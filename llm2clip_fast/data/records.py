"""The unit every caption source yields: one image with its named captions."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Record:
    """One image-caption sample.

    Attributes:
        key: identifier unique within the source (the embedding cache is keyed by it).
        image: the decoded RGB image, or None when the caller asked for captions only.
        captions: caption name -> caption text (e.g. {"short": ..., "long": ...}); never empty strings
            once a record has passed the bad-data checks.
        label: optional class label for zero-shot evaluation (the source's label column), never a caption.
    """

    key: str
    image: Image.Image | None
    captions: dict[str, str] = field(default_factory=dict)
    label: str | None = None
