"""The interface every caption source implements, and the shared image-decoding and caption checks."""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from .bad_data import BadDataTracker, BadSampleError
from .records import Record
from .reduced_decode import DECODED_FROM, DecodeRequest

T = TypeVar("T")


def decode_image(key: str, data: bytes, min_side: int | DecodeRequest | None = None) -> Image.Image:
    """Decode image bytes fully to RGB; any failure becomes :class:`BadSampleError`.

    min_side: the smallest side the consumer needs (None: full size). A much larger image is then
    decoded smaller: JPEG through PIL's ``draft`` (DCT scaling while decoding, so a 9000x9000 photo
    never exists at full size in memory), other formats through ``reduce`` right after decoding (their
    peak stays bounded by PIL's decompression-bomb limit). Both keep at least ``2 * min_side`` pixels
    on each side, so a following resize to ``min_side`` still has detail to average.

    A :class:`~.reduced_decode.DecodeRequest` carries ``min_side`` and, for ``--decode reduced``
    training, a :class:`~.reduced_decode.ReducedDecode`: a JPEG then decodes at the largest reduction
    that keeps every training crop at least the tower's size, and the returned image's
    ``info[DECODED_FROM]`` says (original width, original height, factor) so the crop is drawn on the
    original size and mapped into the reduced image.
    """
    reduce = None
    if isinstance(min_side, DecodeRequest):
        min_side, reduce = min_side.min_side, min_side.reduce
    if not data:
        raise BadSampleError(key, "image is empty (0 bytes)")
    try:
        # Not a `with` block: closing the image would discard its pixels, and an RGB image is returned as
        # decoded (a convert() copy costs as much as a fifth of the decode for a 1024x768 photo).
        image = Image.open(io.BytesIO(data))
        original = image.size
        factor = 1
        if reduce is None:
            if min_side:
                image.draft("RGB", (2 * min_side, 2 * min_side))  # no-op for non-JPEG formats
        elif image.format == "JPEG":
            # PIL honours one draft call: the larger of the two reductions allowed.
            factor = reduce.factor(*original)
            if min_side:
                factor = max(factor, _draft_factor(original, 2 * min_side))
            if factor > 1:
                image.draft("RGB", (original[0] // factor, original[1] // factor))
        image.load()  # decoding happens lazily: load() is what exposes truncated files
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if min_side:
            extra = min(rgb.size) // (2 * min_side)
            if extra >= 2:
                rgb = rgb.reduce(extra)
                factor *= extra
        if reduce is not None:
            rgb.info[DECODED_FROM] = (original[0], original[1], factor)
        return rgb
    except UnidentifiedImageError:
        raise BadSampleError(key, "image cannot be identified (not an image or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadSampleError(key, f"image cannot be decoded ({type(exc).__name__}: {exc})") from None


def _draft_factor(size: tuple[int, int], side: int) -> int:
    """The reduction PIL's JPEG ``draft(mode, (side, side))`` picks for an image of ``size``."""
    scale = min(size[0] // side, size[1] // side)
    return next(k for k in (8, 4, 2, 1) if scale >= k)


def read_image_bytes(key: str, path: str | os.PathLike) -> bytes:
    """An image file's bytes; missing or unreadable files become :class:`BadSampleError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSampleError(key, f"image file is missing: {os.fspath(path)}") from None
    except OSError as exc:
        raise BadSampleError(key, f"image file cannot be read: {os.fspath(path)} ({exc})") from None


def read_image_file(key: str, path: str | os.PathLike,
                    min_side: int | DecodeRequest | None = None) -> Image.Image:
    """Read and decode an image file (``min_side``: see :func:`decode_image`); missing or unreadable
    files become :class:`BadSampleError`."""
    return decode_image(key, read_image_bytes(key, path), min_side)


def check_captions(key: str, captions: dict[str, str], names: list[str]) -> dict[str, str]:
    """Return ``{name: text}`` for ``names``; a missing or blank caption makes the sample bad."""
    out = {}
    for name in names:
        text = captions.get(name)
        if text is None:
            raise BadSampleError(key, f"caption {name!r} is missing")
        if not isinstance(text, str):
            raise BadSampleError(key, f"caption {name!r} is not text ({type(text).__name__})")
        if not text.strip():
            raise BadSampleError(key, f"caption {name!r} is empty")
        out[name] = text
    return out


class CaptionSource(ABC):
    """A random-access collection of (key, image, named captions, optional label) samples.

    Subclasses implement ``__len__``, ``key_at``, ``raw_captions_at``, ``label_at`` and
    ``image_at``. Everything else (checked captions, records, iteration with bad-data accounting)
    is shared, so every source behaves the same in loaders.

    Attributes:
        caption_names: the caption names every sample is expected to carry, in order.
        label_column: name of the label field, or None when the source has no labels.
        bad_data: tracker used by ``iter_captions`` / ``iter_records`` when none is passed.
    """

    caption_names: list[str]
    label_column: str | None
    bad_data: BadDataTracker

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abstractmethod
    def key_at(self, index: int) -> str:
        """The sample's key."""

    @abstractmethod
    def raw_captions_at(self, index: int) -> dict[str, str]:
        """Captions as stored (unchecked); may lack names or hold empty strings."""

    @abstractmethod
    def label_at(self, index: int) -> str | None:
        """The sample's label, or None without a label column."""

    @abstractmethod
    def image_at(self, index: int) -> Image.Image:
        """The decoded RGB image; raises :class:`BadSampleError` when it is missing or broken."""

    def image_bytes_at(self, index: int) -> bytes:
        """The image's encoded bytes, undecoded (``--decode gpu`` decodes them on the device); raises
        :class:`BadSampleError` when it is missing. Sources that cannot hand them out raise
        NotImplementedError (see :attr:`serves_image_bytes`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot hand out undecoded image bytes; decode "
                                  "on the CPU (--decode exact or reduced)")

    @property
    def serves_image_bytes(self) -> bool:
        """Whether :meth:`image_bytes_at` is implemented (local manifests and WebDataset shards)."""
        return type(self).image_bytes_at is not CaptionSource.image_bytes_at

    def describe(self) -> str:
        return type(self).__name__

    #: Smallest image side consumers need (None: decode at full size), or a
    #: :class:`~.reduced_decode.DecodeRequest` (``--decode reduced``); see :func:`decode_image`.
    decode_min_side: int | DecodeRequest | None = None

    def set_decode_min_side(self, min_side: int | DecodeRequest | None) -> None:
        """Let :meth:`image_at` decode large images smaller, keeping at least ``2 * min_side`` pixels a side
        (loaders with the CLIP transform set it to their image size), or pass a :class:`DecodeRequest`."""
        self.decode_min_side = min_side

    # Shared behaviour -------------------------------------------------------------------------

    def captions_at(self, index: int) -> dict[str, str]:
        """Checked captions of sample ``index``; raises :class:`BadSampleError` when one is empty."""
        return check_captions(self.key_at(index), self.raw_captions_at(index), self.caption_names)

    def record_at(self, index: int, with_image: bool = True) -> Record:
        """The full :class:`Record`; raises :class:`BadSampleError` for a bad sample."""
        captions = self.captions_at(index)
        image = self.image_at(index) if with_image else None
        return Record(self.key_at(index), image, captions, self.label_at(index))

    def keys(self) -> list[str]:
        """All keys, in source order."""
        return [self.key_at(i) for i in range(len(self))]

    def labels(self) -> dict[str, str]:
        """key -> label for every sample with a label (empty when the source has no label column)."""
        if self.label_column is None:
            return {}
        out = {}
        for i in range(len(self)):
            label = self.label_at(i)
            if label is not None:
                out[self.key_at(i)] = label
        return out

    def iter_good(self, fetch: Callable[[int], T],
                  bad_data: BadDataTracker | None = None) -> Iterator[tuple[int, T]]:
        """Yield ``(index, fetch(index))`` in source order for every sample ``fetch`` can read.

        A sample whose ``fetch`` raises :class:`~.bad_data.BadSampleError` is skipped and counted in
        ``bad_data`` (default: ``self.bad_data``), which raises :class:`~.bad_data.BadDataError` past its
        threshold.
        """
        tracker = bad_data if bad_data is not None else self.bad_data
        for i in range(len(self)):
            tracker.add_seen()
            try:
                value = fetch(i)
            except BadSampleError as bad:
                tracker.add_bad(bad.key, bad.reason)
                tracker.check()
                continue
            yield i, value

    def iter_captions(self, bad_data: BadDataTracker | None = None) -> Iterator[tuple[str, dict[str, str]]]:
        """Yield ``(key, {name: caption})`` in source order without touching images; samples with a
        missing or empty caption are skipped and counted (:meth:`iter_good`)."""
        for i, captions in self.iter_good(self.captions_at, bad_data):
            yield self.key_at(i), captions

    def iter_records(self, bad_data: BadDataTracker | None = None) -> Iterator[Record]:
        """Yield every good :class:`Record` (image decoded to RGB) in source order; bad samples (missing
        or undecodable image, empty caption) are skipped and counted (:meth:`iter_good`)."""
        for _, record in self.iter_good(self.record_at, bad_data):
            yield record

    def __repr__(self) -> str:
        return self.describe()
