"""CLIP image preprocessing with PIL and torch only (torchvision does not install beside CPU torch).

Evaluation: resize the short side to ``size`` (bicubic), centre crop ``size`` x ``size``, scale to [0, 1],
normalise with the CLIP mean/std. Training: a random resized crop (area fraction ``scale``, aspect
``ratio``; the torchvision algorithm) resized to ``size`` x ``size``, then the same normalisation. The
random choice comes from a ``random.Random`` the caller passes, so loaders can seed it per
(seed, epoch, key) and reproduce any batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .reduced_decode import DECODED_FROM, ReducedDecode, map_box

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
OUTPUTS = ("float32", "uint8")


def resize_short_side(image: Image.Image, size: int,
                      resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so the shorter side is ``size``, keeping the aspect ratio (bicubic, as CLIP does)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` region (the image must be at least that big)."""
    w, h = image.size
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop with area fraction in ``scale`` and aspect in ``ratio``.

    Same algorithm as torchvision's RandomResizedCrop: ten tries, then a centre crop clamped to ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8, unnormalised: a quarter of the float32 bytes to collate, pin and
    copy to the device, where :func:`normalize_uint8` finishes it."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def normalize_uint8(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) on any device -> float32 ``(pixel / 255 - mean) / std`` per channel.

    The same float32 operations in the same order as :func:`to_normalized_tensor`'s lookup table, so the
    result is bit-identical to the float path: uint8 transfer changes no number of a run."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.to(torch.float32).div_(255.0).sub_(m).div_(s)


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, (pixel / 255 - mean) / std per channel.

    A 256-entry lookup table per channel does the arithmetic: numpy indexing stays single-threaded
    and fast inside DataLoader workers, where small torch element-wise ops suffer from thread contention.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    table = (levels[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    out = np.stack([table[c][array[:, :, c]] for c in range(3)])
    return torch.from_numpy(out)


class ClipImageTransform:
    """Callable ``(image, rng=None) -> FloatTensor (3, size, size)``; see :func:`clip_image_transform`."""

    def __init__(
        self,
        size: int,
        train: bool,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        mean: Sequence[float],
        std: Sequence[float],
        resize: str = "shortest_edge",
        resample: str = "bicubic",
        resize_size: int | None = None,
        output: str = "float32",
    ):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        self.size = size
        self.train = train
        self.scale = scale
        self.ratio = ratio
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.resize = resize
        self.resample = resample
        self.resize_size = resize_size
        self._filter = _FILTERS[resample]

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        decoded_from = image.info.get(DECODED_FROM)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.train:
            rng = rng if rng is not None else random.Random()
            # A reduced-size decode (--decode reduced) draws the crop on the original size, then maps it.
            width, height, factor = decoded_from or (image.width, image.height, 1)
            left, top, w, h = random_resized_crop_box(width, height, self.scale, self.ratio, rng)
            box = (left, top, left + w, top + h)
            if factor > 1:
                box = map_box(box, factor)
            image = image.resize((self.size, self.size), self._filter, box=box)
        elif self.resize == "square":  # SigLIP / ViT processors, timm's 'squash': aspect not kept
            side = self.resize_size or self.size
            image = image.resize((side, side), self._filter)
            if side != self.size:
                image = center_crop(image, self.size)
        else:
            short = self.resize_size or self.size
            image = center_crop(resize_short_side(image, short, self._filter), self.size)
        if self.output == "uint8":
            return to_uint8_tensor(image)
        return to_normalized_tensor(image, self.mean, self.std)

    def reduced_decode(self) -> ReducedDecode:
        """The decode plan of ``--decode reduced`` for this (training) transform's crops."""
        if not self.train:
            raise ValueError("reduced-size decoding is for training crops only; evaluation decodes exactly")
        return ReducedDecode(self.size, self.scale, self.ratio)

    def __repr__(self) -> str:
        mode = f"train, scale={self.scale}, ratio={self.ratio}" if self.train else f"eval, {self.resize}"
        return (f"ClipImageTransform(size={self.size}, {mode}, {self.resample}, mean={self.mean}, "
                f"std={self.std})")


def clip_image_transform(
    size: int = 224,
    train: bool = False,
    *,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resize: str = "shortest_edge",
    resample: str = "bicubic",
    resize_size: int | None = None,
    output: str = "float32",
) -> ClipImageTransform:
    """CLIP preprocessing: PIL image -> normalised float32 tensor (3, size, size).

    Args:
        size: output side in pixels.
        train: random resized crop (``scale``, ``ratio``) instead of resize-short-side + centre crop.
        scale: range of the crop's area as a fraction of the image (train only).
        ratio: range of the crop's aspect ratio w/h (train only).
        mean, std: per-channel normalisation (default: CLIP's).
        resize: evaluation resize: "shortest_edge" (short side to ``resize_size`` or ``size``, then a
            centre crop; CLIP) or "square" (the whole image to ``resize_size`` or ``size`` square, aspect
            not kept, then a centre crop; SigLIP, ViT, timm's 'squash' crop mode).
        resize_size: the side before the centre crop (default ``size``; >= ``size``).
        resample: "bicubic" or "bilinear".
        output: "float32" (normalised) or "uint8" (unnormalised; :func:`normalize_uint8` on the device
            gives the float32 result bit for bit).
    """
    if resize not in ("shortest_edge", "square"):
        raise ValueError(f"resize must be 'shortest_edge' or 'square', got {resize!r}")
    if resample not in _FILTERS:
        raise ValueError(f"resample must be one of {sorted(_FILTERS)}, got {resample!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if resize_size is not None and (not isinstance(resize_size, int) or resize_size < size):
        raise ValueError(f"resize_size must be an int >= size ({size}), got {resize_size!r}")
    if not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale!r}")
    if not (0.0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean!r}, std={std!r}")
    return ClipImageTransform(size, train, tuple(scale), tuple(ratio), mean, std, resize, resample,
                              resize_size, output)


def image_transform_for(preprocessing: Any, train: bool = False, *, scale: tuple[float, float] = (0.9, 1.0),
                        output: str = "float32") -> ClipImageTransform:
    """The transform of a tower's :class:`~llm2clip_fast.models.image_preprocessing.ImagePreprocessing`:
    its size, mean/std, resize mode and filter (training: a random resized crop with ``scale``);
    ``output`` as in :func:`clip_image_transform`."""
    p = preprocessing
    return clip_image_transform(p.image_size, train=train, scale=scale, mean=p.mean, std=p.std,
                                resize=p.resize, resample=p.resample, resize_size=p.resize_size,
                                output=output)
