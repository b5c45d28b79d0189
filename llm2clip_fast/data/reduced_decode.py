"""Reduced-size JPEG decoding for training crops (opt-in: ``--decode reduced``).

A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size by scaling the DCT (PIL's ``Image.draft``): the
decoder then does a quarter, a sixteenth or a 64th of the work, and the resize that follows has fewer
pixels to filter. For a training crop the decision can be made before decoding, from the image's size
alone: :meth:`ReducedDecode.factor` is the largest reduction for which *every* crop the random resized
crop can draw (area fraction ``scale``, aspect ``ratio``, and its centre-crop fallback) still has at least
``size`` pixels on each side in the reduced image, so the final resize stays a downscale.

The random crop is drawn on the original size as always (the same draws, the same box; the loader's seeded
``random.Random`` per sample is untouched) and mapped into the reduced image (a reduced pixel covers
``factor`` original ones), so exact resume and the crop statistics hold. The pixels differ slightly from a
full decode followed by the same resize (the DCT-domain downscale is a box-like filter, then bicubic), which
is why it is a choice a run makes, never the default, and never used for evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Set on a reduced image's ``info``: (original width, original height, factor).
DECODED_FROM = "llm2clip_fast.decoded_from"
FACTORS = (8, 4, 2)


@dataclass(frozen=True)
class ReducedDecode:
    """The crops a training transform draws: output ``size``, area fraction range ``scale``, aspect range
    ``ratio`` (w/h), as :func:`~llm2clip_fast.data.image_transforms.random_resized_crop_box` draws them."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]

    def smallest_crop_side(self, width: int, height: int) -> float:
        """The shortest side any crop of a ``width`` x ``height`` image can have."""
        area = width * height
        s0 = self.scale[0]
        r0, r1 = self.ratio
        # A drawn crop has w = sqrt(A s a), h = sqrt(A s / a), both within the image; its shortest side is
        # smallest at the smallest area and the extreme aspect ratios.
        drawn = min(math.sqrt(area * s0 * r0), math.sqrt(area * s0 / r1))
        # The fallback after ten failed draws: the whole image clamped to the ratio range.
        in_ratio = width / height
        if in_ratio < r0:
            fallback = (width, round(width / r0))
        elif in_ratio > r1:
            fallback = (round(height * r1), height)
        else:
            fallback = (width, height)
        return min(drawn, *fallback)

    def factor(self, width: int, height: int) -> int:
        """The largest JPEG reduction (8, 4, 2, else 1) that keeps every possible crop at least ``size``
        pixels on each side."""
        side = self.smallest_crop_side(width, height)
        for k in FACTORS:
            if side / k >= self.size and width // k >= 1 and height // k >= 1:
                return k
        return 1


@dataclass(frozen=True)
class DecodeRequest:
    """What a source's decoder is asked for: ``min_side`` (large images may decode down to about twice
    this; see :func:`~llm2clip_fast.data.caption_source.decode_image`) and ``reduce`` (reduced-size JPEG
    decoding for training crops, or None)."""

    min_side: int | None = None
    reduce: ReducedDecode | None = None


def map_box(box: tuple[float, float, float, float], factor: int) -> tuple[float, float, float, float]:
    """A (left, top, right, bottom) box in original pixels, in the coordinates of an image decoded at
    ``1 / factor`` (PIL's draft: reduced pixel ``i`` covers original pixels ``[i*factor, (i+1)*factor)``)."""
    return tuple(v / factor for v in box)  # type: ignore[return-value]


__all__ = ["DECODED_FROM", "DecodeRequest", "ReducedDecode", "map_box"]
