"""Decoding training JPEGs on the GPU (opt-in: ``--decode gpu``).

The CPU then only reads bytes and draws crops: a loader worker reads each image's bytes, reads its size
from the header (PIL opens lazily: no pixel is decoded) and draws the random resized crop on that size
with the sample's seeded generator, exactly as the CPU path draws it. The main process hands the batch's
JPEG bytes to nvJPEG (``torchvision.io.decode_jpeg(..., device="cuda")``, one batched call), crops each
image on the device, resizes it to the tower's size (bicubic or bilinear with antialiasing, torch's
``interpolate``), rounds to 8-bit levels as PIL would and normalises.

Images that are not JPEG (PNG, WebP, ...) are decoded and transformed on the CPU by the worker, as in the
exact path, and travel as uint8 pixels. A JPEG nvJPEG cannot decode is a bad sample (counted in the
loader's bad-data tracker, dropped from the batch), found in the main process.

The pixels differ slightly from PIL's (another IDCT, another resampling kernel), so the path is a choice a
run makes; the crops, the batches and exact resume are those of the CPU path. It needs CUDA and a
torchvision built for the installed torch (:func:`unavailable_reason` says what is missing); the data
source must hand out undecoded bytes (local manifests and WebDataset shards do).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .bad_data import BadSampleError
from .caption_source import decode_image
from .image_transforms import ClipImageTransform, normalize_uint8, random_resized_crop_box

DecodeFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why ``--decode gpu`` cannot run on ``device`` (None: it can): no CUDA device, no torchvision, or a
    torchvision whose image ops do not load or do not decode on this device."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"decoding JPEGs on the GPU needs a CUDA device; this run is on {device.type}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        from torchvision.io import decode_jpeg
    except Exception as exc:  # a CPU/CUDA mismatch raises RuntimeError from its op registrations
        return (f"torchvision is not importable ({type(exc).__name__}: {exc}); install the torchvision "
                f"built for torch {torch.__version__}")
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(probe, format="JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)], device=device)
    except Exception as exc:  # the image extension did not load, or nvJPEG failed
        return f"torchvision.io.decode_jpeg cannot decode on {device} ({type(exc).__name__}: {exc})"
    return None


class JpegCropTransform:
    """The worker side of ``--decode gpu``: ``encode(key, data, rng)`` -> ``{"jpeg": uint8 bytes tensor,
    "box": (left, top, width, height)}`` for a JPEG, ``{"pixels": uint8 (3, S, S)}`` for anything else
    (transformed on the CPU by ``fallback``, the exact path's uint8 training transform)."""

    wants_bytes = True

    def __init__(self, fallback: ClipImageTransform) -> None:
        if not fallback.train or fallback.output != "uint8":
            raise ValueError("JpegCropTransform needs a uint8 training ClipImageTransform as its fallback")
        self.fallback = fallback
        self.size = fallback.size

    def encode(self, key: str, data: bytes, rng: random.Random) -> dict[str, Any]:
        if not data:
            raise BadSampleError(key, "image is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height), mode = image.format, image.size, image.mode
        except UnidentifiedImageError:
            raise BadSampleError(key, "image cannot be identified (not an image or an unsupported "
                                 "format)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise BadSampleError(key, f"image cannot be decoded ({type(exc).__name__}: {exc})") from None
        if fmt != "JPEG" or mode not in ("RGB", "L"):  # nvJPEG: baseline/progressive YCbCr and greyscale
            return {"pixels": self.fallback(decode_image(key, data), rng)}
        t = self.fallback
        left, top, w, h = random_resized_crop_box(width, height, t.scale, t.ratio, rng)
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "box": (left, top, w, h),
                "key": key}

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """A decoded image (callers that are not the loader): the CPU fallback."""
        return self.fallback(image, rng)


def _torchvision_decode(device: torch.device) -> DecodeFn:
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))

    return decode


def decode_batch(items: Sequence[dict[str, Any]], *, size: int, mean: Sequence[float], std: Sequence[float],
                 resample: str, device: torch.device, decode_fn: DecodeFn | None = None
                 ) -> tuple[torch.Tensor, list[tuple[int, str, str]]]:
    """The main-process side: ``items`` from :meth:`JpegCropTransform.encode` -> (float32 pixels
    (B_good, 3, size, size) on ``device``, normalised; bad samples as (index, key, reason)).

    ``decode_fn`` (tests) replaces nvJPEG: a list of uint8 byte tensors -> a list of uint8 (3, H, W)."""
    decode_fn = decode_fn or _torchvision_decode(device)
    jpeg_at = [i for i, it in enumerate(items) if "jpeg" in it]
    decoded: dict[int, torch.Tensor] = {}
    bad: list[tuple[int, str, str]] = []
    if jpeg_at:
        datas = [items[i]["jpeg"] for i in jpeg_at]
        try:
            decoded = dict(zip(jpeg_at, decode_fn(datas)))
        except RuntimeError:  # one bad file fails the batched call: find it
            for i in jpeg_at:
                try:
                    decoded[i] = decode_fn([items[i]["jpeg"]])[0]
                except RuntimeError as exc:
                    why = f"image cannot be decoded on the GPU ({exc})"
                    bad.append((i, items[i].get("key", str(i)), why))
    mode = "bicubic" if resample == "bicubic" else "bilinear"
    out = []
    bad_at = {b[0] for b in bad}
    for i, it in enumerate(items):
        if i in bad_at:
            continue
        if "pixels" in it:
            out.append(it["pixels"].to(device, non_blocking=True))
            continue
        left, top, w, h = it["box"]
        crop = decoded[i].to(device)[:, top:top + h, left:left + w].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode=mode, align_corners=False, antialias=True)
        out.append(resized.squeeze(0).round_().clamp_(0, 255).to(torch.uint8))  # 8-bit levels, as PIL
    if not out:
        return torch.empty(0, 3, size, size, device=device), bad
    return normalize_uint8(torch.stack(out), mean, std), bad


__all__ = ["JpegCropTransform", "decode_batch", "unavailable_reason"]
