"""How a vision tower wants its images: size, resize mode, resampling filter, mean and std.

Each family has its own preprocessing, and a tower must be trained and evaluated with the one it was
pretrained with:

- CLIP (``CLIPImageProcessor``): resize the short side to S (bicubic), centre crop S x S, CLIP's
  mean/std (0.4815, 0.4578, 0.4082) / (0.2686, 0.2613, 0.2758);
- SigLIP (``SiglipImageProcessor``): resize to S x S without keeping the aspect (bicubic), mean and
  std 0.5;
- ViT (``ViTImageProcessor``): resize to S x S (bilinear), mean and std 0.5.

A tower loaded from a folder with a ``preprocessor_config.json`` takes that file's values
(``image_mean``, ``image_std``, ``size``/``crop_size``, ``do_center_crop``, ``resample``) instead, as
the transformers image processor of that folder would. The choice is saved in the model's
``config.json`` (``vision.preprocessing``), so evaluation and continued training use the same; a model
saved before this field existed was trained with CLIP's preprocessing whatever its tower, and loads so.
Matched against transformers 5.24 ``CLIPImageProcessor``, ``SiglipImageProcessor``, ``ViTImageProcessor``
defaults. An OpenCLIP model's ``preprocess_cfg`` (``open_clip_config.json``) converts both ways
(:meth:`ImagePreprocessing.from_open_clip`, :meth:`ImagePreprocessing.to_open_clip`), matched against
open_clip_torch 3.3.0 ``open_clip/transform.py`` (``PreprocessCfg``, ``image_transform`` at eval). A timm
model's data config (``timm.data.resolve_data_config``) converts with :meth:`ImagePreprocessing.from_timm`,
matched against timm 1.0.31 ``timm/data/transforms_factory.py`` (``transforms_imagenet_eval``): crop_pct
below 1 resizes to ``floor(size / crop_pct)`` before the centre crop (``resize_size``), keeping the
aspect ('center' crop mode) or not ('squash').
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
# shortest_edge: the short side to resize_size (default image_size), then a centre crop;
# square: the whole image to resize_size x resize_size (aspect not kept), then a centre crop (none when
# resize_size is None: straight to image_size x image_size)
RESIZE_MODES = ("shortest_edge", "square")
RESAMPLE_FILTERS = ("bicubic", "bilinear")
# PIL's Image.Resampling values, as preprocessor_config.json stores them.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocessing:
    """A tower's image preprocessing; ``image_size`` is the side of the square the tower sees."""

    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "shortest_edge"
    resample: str = "bicubic"
    # the side before the centre crop (None: image_size, CLIP's 224 -> 224; timm's crop_pct 0.9: 248)
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {RESAMPLE_FILTERS}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values each (std > 0), got {self.mean!r}, {self.std!r}")
        if self.resize_size is not None and (not isinstance(self.resize_size, int)
                                             or self.resize_size < self.image_size):
            raise ValueError(f"resize_size must be an int >= image_size ({self.image_size}), got "
                             f"{self.resize_size!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePreprocessing:
        unknown = sorted(set(d) - {"image_size", "mean", "std", "resize", "resample", "resize_size"})
        if unknown:
            raise ValueError(f"image preprocessing: unknown fields {unknown}")
        return cls(image_size=int(d["image_size"]), mean=tuple(d.get("mean", CLIP_MEAN)),
                   std=tuple(d.get("std", CLIP_STD)), resize=d.get("resize", "shortest_edge"),
                   resample=d.get("resample", "bicubic"), resize_size=d.get("resize_size"))

    @classmethod
    def default_for(cls, kind: str, image_size: int) -> ImagePreprocessing:
        """The transformers image processor's defaults for a tower family."""
        if kind == "clip":
            return cls(image_size, CLIP_MEAN, CLIP_STD, "shortest_edge", "bicubic")
        if kind == "siglip":
            return cls(image_size, HALF, HALF, "square", "bicubic")
        if kind == "vit":
            return cls(image_size, HALF, HALF, "square", "bilinear")
        raise ValueError(f"no default preprocessing for a {kind!r} tower")

    @classmethod
    def from_hf_folder(cls, folder: str | Path, kind: str, image_size: int) -> ImagePreprocessing:
        """The folder's ``preprocessor_config.json`` where there is one, else :meth:`default_for`.

        ``image_size``: the tower's own (config.json); a processor that produces another size is an
        error, since the tower's position embeddings fix it.
        """
        path = Path(folder) / "preprocessor_config.json"
        base = cls.default_for(kind, image_size)
        if not path.is_file():
            return base
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        crop = bool(cfg.get("do_center_crop", base.resize == "shortest_edge"))
        resize_side = _side(cfg["size"], path) if cfg.get("size") is not None else image_size
        side = _side(cfg["crop_size"], path) if crop and cfg.get("crop_size") is not None else resize_side
        if side != image_size:
            raise ValueError(f"{path}: images of {side} pixels, but the tower takes {image_size}")
        resample = _PIL_RESAMPLE.get(cfg.get("resample"), base.resample)
        return cls(image_size=image_size, mean=tuple(cfg.get("image_mean", base.mean)),
                   std=tuple(cfg.get("image_std", base.std)),
                   resize="shortest_edge" if crop else "square", resample=resample,
                   resize_size=resize_side if crop and resize_side != image_size else None)

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict[str, Any] | None, image_size: int) -> ImagePreprocessing:
        """OpenCLIP's eval transform for ``preprocess_cfg`` (missing fields: ``PreprocessCfg``'s defaults,
        OpenAI CLIP's mean/std, bicubic, ``resize_mode`` 'shortest'). As OpenCLIP's factory does, the
        size is the tower's ``image_size`` whatever ``size`` says. ``resize_mode`` 'shortest' resizes the
        short side to the size and centre-crops, 'squash' resizes to a square; 'longest' (resize the long
        side, pad with ``fill_color``) has no equivalent here and is a ValueError."""
        cfg = {k: v for k, v in (preprocess_cfg or {}).items() if v is not None}
        mean, std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else tuple(mean)
        std = (std,) * 3 if isinstance(std, (int, float)) else tuple(std)
        interpolation = cfg.get("interpolation", "bicubic")
        # OpenCLIP: 'random' only varies the training filter; its eval transform uses bicubic.
        resample = {"bicubic": "bicubic", "random": "bicubic", "bilinear": "bilinear"}.get(interpolation)
        if resample is None:
            raise ValueError(f"OpenCLIP preprocess_cfg interpolation {interpolation!r}: expected 'bicubic', "
                             "'bilinear' or 'random'")
        mode = cfg.get("resize_mode", "shortest")
        resize = {"shortest": "shortest_edge", "squash": "square"}.get(mode)
        if resize is None:
            raise ValueError(f"OpenCLIP preprocess_cfg resize_mode {mode!r} is not supported (supported: "
                             "'shortest' = resize the short side and centre-crop, 'squash' = resize to a "
                             "square; 'longest' pads the image, which the data pipeline does not do)")
        return cls(image_size=image_size, mean=mean, std=std, resize=resize, resample=resample)

    @classmethod
    def from_timm(cls, data_config: dict[str, Any]) -> ImagePreprocessing:
        """timm's eval transform for a data config (``timm.data.resolve_data_config``): ``input_size``,
        ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``crop_mode`` ('center': resize the short
        side to ``floor(size / crop_pct)`` and centre-crop; 'squash': resize to that square, then crop).
        ValueError for what the data pipeline does not reproduce (the 'border' crop mode, crop_pct > 1,
        filters other than bicubic/bilinear, non-square sizes)."""
        _, height, width = (int(v) for v in data_config["input_size"])
        if height != width:
            raise ValueError(f"timm data config input_size {data_config['input_size']}: only square images "
                             "are supported")
        interpolation = data_config.get("interpolation", "bicubic")
        if interpolation not in RESAMPLE_FILTERS:
            raise ValueError(f"timm data config interpolation {interpolation!r} is not supported (supported: "
                             f"{', '.join(RESAMPLE_FILTERS)})")
        crop_pct = float(data_config.get("crop_pct", 1.0))
        if not 0 < crop_pct <= 1:
            raise ValueError(f"timm data config crop_pct {crop_pct} is not supported (0 < crop_pct <= 1; "
                             "above 1 timm pads the image, which the data pipeline does not do)")
        mode = data_config.get("crop_mode", "center")
        resize = {"center": "shortest_edge", "squash": "square"}.get(mode)
        if resize is None:
            raise ValueError(f"timm data config crop_mode {mode!r} is not supported (supported: 'center' = "
                             "resize the short side and centre-crop, 'squash' = resize to a square and "
                             "centre-crop; 'border' pads the image, which the data pipeline does not do)")
        resize_size = math.floor(height / crop_pct)
        return cls(image_size=height, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                   resize=resize, resample=interpolation,
                   resize_size=resize_size if resize_size != height else None)

    def to_open_clip(self) -> dict[str, Any]:
        """The ``preprocess_cfg`` of ``open_clip_config.json`` that OpenCLIP turns into this eval transform.
        ValueError for a ``resize_size`` (resize larger, then crop), which OpenCLIP's transforms lack."""
        if self.resize_size is not None:
            raise ValueError(f"this preprocessing resizes to {self.resize_size} before a {self.image_size} "
                             "centre crop; OpenCLIP's preprocess_cfg resizes straight to the crop size, so "
                             "it cannot describe it")
        return {"size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.resample,
                "resize_mode": "shortest" if self.resize == "shortest_edge" else "squash"}


def _side(size: Any, path: Path) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"{path}: non-square size {size} is not supported")
            return int(size["height"])
    raise ValueError(f"{path}: cannot read an image size from {size!r}")
