"""What a benchmark reader returns: the images and captions (or classes) of one suite, on local disk.

Readers only list files and texts; nothing is decoded here. A listed image that is absent or cannot
be decoded is found when the images are embedded and reported there, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class SuiteLayoutError(FileNotFoundError):
    """A suite's folder lacks a file its layout needs; the message names the path and the layout."""

    def __init__(self, suite: str, missing: str | os.PathLike[str], layout: str, detail: str = "") -> None:
        self.suite, self.missing, self.layout = suite, str(missing), layout
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{suite}: expected {missing}{extra}; the {suite} layout is:\n{layout}")


@dataclass
class RetrievalSuite:
    """Image-text retrieval data: ``captions[i]`` describes ``images[caption_image[i]]``.

    ``image_ids`` are the names reported for missing images (paths relative to ``root``).
    ``skipped`` lists records the reader dropped before any image was opened (e.g. an Urban-1k caption
    file without an image), as ``{id: reason}``.
    """

    name: str
    root: Path
    images: list[Path]
    image_ids: list[str]
    captions: list[str]
    caption_image: list[int]
    skipped: dict[str, str] = field(default_factory=dict)

    kind = "retrieval"

    def __post_init__(self) -> None:
        if len(self.images) != len(self.image_ids):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.image_ids)} ids")
        if len(self.captions) != len(self.caption_image):
            raise ValueError(f"{self.name}: {len(self.captions)} captions but {len(self.caption_image)} "
                             "caption->image indices")
        if any(not 0 <= i < len(self.images) for i in self.caption_image):
            raise ValueError(f"{self.name}: a caption points outside the {len(self.images)} images")
        if not self.images:
            raise ValueError(f"{self.name}: the reader found no images under {self.root}")

    def text_fingerprint(self) -> str:
        """SHA-256 of the caption texts in order (what the text-embedding cache is keyed by)."""
        return _sha256_json(self.captions)


@dataclass
class ClassificationSuite:
    """Zero-shot classification data: ``labels[i]`` is the class index of ``images[i]``; each class is
    embedded as the normalised mean of its ``templates`` (``{}`` marks the class name)."""

    name: str
    root: Path
    images: list[Path]
    image_ids: list[str]
    labels: list[int]
    class_names: list[str]
    templates: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

    kind = "classification"

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.image_ids) == len(self.labels)):
            raise ValueError(f"{self.name}: images, image_ids and labels differ in length")
        if not self.images:
            raise ValueError(f"{self.name}: the reader found no images under {self.root}")
        if any(not 0 <= i < len(self.class_names) for i in self.labels):
            raise ValueError(f"{self.name}: a label points outside the {len(self.class_names)} classes")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if not self.templates or bad:
            raise ValueError(f"{self.name}: every template needs exactly one '{{}}' for the class name; "
                             f"got {bad[:3] or 'none'}")

    @property
    def prompts(self) -> list[str]:
        """Every class x template prompt, class-major: prompt ``c * T + t``."""
        return [t.replace("{}", name) for name in self.class_names for t in self.templates]

    def text_fingerprint(self) -> str:
        return _sha256_json(self.prompts)


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def images_fingerprint(images: list[Path]) -> str:
    """SHA-256 over every image's path, size and modification time (absent files marked so).

    Hashing contents would read all of ImageNet-val (6 GB) on every run; a replaced or touched file
    changes its size or time, which is what a stale cache must notice.
    """
    h = hashlib.sha256()
    for path in images:
        try:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
