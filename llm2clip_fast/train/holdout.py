"""A held-out evaluation split carved out of a caption source, by a hash of each key.

The split depends only on (key, seed, fraction): the same sample lands on the same side on every
machine, rank and resume, whatever the order of the source.
"""

from __future__ import annotations

import hashlib

from PIL import Image

from ..data.caption_source import CaptionSource


def _key_fraction(key: str, seed: int) -> float:
    digest = hashlib.blake2b(f"holdout/{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class SubsetSource(CaptionSource):
    """The samples of ``source`` at ``indices`` (in that order), sharing its caption names and labels."""

    def __init__(self, source: CaptionSource, indices: list[int]) -> None:
        self.source = source
        self.indices = list(indices)
        self.caption_names = list(source.caption_names)
        self.label_column = source.label_column
        self.bad_data = source.bad_data

    def __len__(self) -> int:
        return len(self.indices)

    def key_at(self, index: int) -> str:
        return self.source.key_at(self.indices[index])

    def raw_captions_at(self, index: int) -> dict[str, str]:
        return self.source.raw_captions_at(self.indices[index])

    def label_at(self, index: int) -> str | None:
        return self.source.label_at(self.indices[index])

    def image_at(self, index: int) -> Image.Image:
        return self.source.image_at(self.indices[index])

    def set_decode_min_side(self, min_side: int | None) -> None:
        self.source.set_decode_min_side(min_side)

    def describe(self) -> str:
        return f"SubsetSource({len(self)} of {self.source.describe()})"


def split_holdout(source: CaptionSource, fraction: float, *, seed: int = 0,
                  max_heldout: int | None = None) -> tuple[CaptionSource, CaptionSource]:
    """(train, held-out) subsets of ``source``; about ``fraction`` of the keys are held out.

    max_heldout caps the held-out side (the keys with the smallest hashes are kept; the rest go back
    to training). Raises ValueError when either side would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    scored = [(_key_fraction(source.key_at(i), seed), i) for i in range(len(source))]
    held = sorted((s, i) for s, i in scored if s < fraction)
    if max_heldout is not None:
        held = held[:max_heldout]
    held_set = {i for _, i in held}
    train = [i for i in range(len(source)) if i not in held_set]
    if not held or not train:
        raise ValueError(f"holding out {fraction:.3g} of {len(source)} samples leaves "
                         f"{len(train)} to train on and {len(held)} to evaluate; change the fraction "
                         "or pass a separate evaluation set")
    return SubsetSource(source, train), SubsetSource(source, sorted(held_set))
