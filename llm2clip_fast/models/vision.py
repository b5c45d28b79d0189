"""Vision towers for LLM2CLIP: transformers' CLIP, SigLIP and ViT image encoders and timm's ViT-style
models (EVA02 included) behind one interface.

A :class:`VisionTower` turns ``pixel_values`` (B, 3, S, S) into one pooled feature per image
(B, hidden_size), the way each family pools: CLIP takes the class token after the post-LayerNorm,
SigLIP its attention-pooling head, ViT the class token of the final LayerNorm output, timm models their
pre-logits features (:mod:`llm2clip_fast.models.timm_vision`). It also knows
which parameters belong to which transformer layer (for layer-wise learning-rate decay and for
freezing the first layers) and which module class is one layer (for FSDP wrapping).

Towers are built from a named preset (:data:`VISION_PRESETS`), a timm model name
(:meth:`VisionTower.from_timm`, random init), a config dict as saved by :meth:`VisionTower.config_dict`,
or loaded with weights from a local transformers folder.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import timm_vision
from .image_preprocessing import ImagePreprocessing

HF_KINDS = ("clip", "siglip", "vit")
VISION_KINDS = (*HF_KINDS, "timm")

# Presets name an architecture, never weights: they build randomly initialised towers.
VISION_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train a few hundred steps on 2 CPU cores in minutes (65 tokens, 4 layers).
    "demo-tiny": {
        "kind": "clip",
        "config": {"image_size": 64, "patch_size": 8, "hidden_size": 192, "intermediate_size": 768,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "hidden_act": "gelu"},
    },
    # For smoke tests and CI: a full training step takes milliseconds.
    "micro": {
        "kind": "clip",
        "config": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": "gelu"},
    },
    # OpenAI CLIP ViT-B/16 geometry, for benchmarks.
    "vit-b-16": {
        "kind": "clip",
        "config": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu"},
    },
    # The tower size the LLM2CLIP paper fine-tunes (ViT-L/14 at 224 and 336).
    "vit-l-14": {
        "kind": "clip",
        "config": {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "hidden_act": "quick_gelu"},
    },
    "vit-l-14-336": {
        "kind": "clip",
        "config": {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "hidden_act": "quick_gelu"},
    },
}

_LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
# Parameters that sit before the first transformer layer (patch/position embeddings, CLIP's pre-LN).
_STEM_PREFIXES = ("embeddings.", "pre_layrnorm.")


def _config_class(kind: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig, ViTConfig

    return {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig, "vit": ViTConfig}[kind]


def _model_from_config(kind: str, config) -> nn.Module:
    from transformers import CLIPVisionModel, SiglipVisionModel, ViTModel

    if kind == "clip":
        return CLIPVisionModel(config)
    if kind == "siglip":
        return SiglipVisionModel(config)
    return ViTModel(config, add_pooling_layer=False)


def _check_kind(kind: str) -> None:
    if kind not in VISION_KINDS:
        raise ValueError(f"vision tower kind must be one of {VISION_KINDS}, got {kind!r}")


class VisionTower(nn.Module):
    """An image encoder that returns one pooled feature per image.

    Args:
        kind: "clip", "siglip", "vit" or "timm".
        model: the transformers model (``CLIPVisionModel``, ``SiglipVisionModel`` or ``ViTModel``), or
            for "timm" a model from :func:`~llm2clip_fast.models.timm_vision.create_timm_model`.
        preprocessing: default: the family's (transformers' processor defaults; timm's data config).
    """

    def __init__(self, kind: str, model: nn.Module,
                 preprocessing: ImagePreprocessing | None = None) -> None:
        super().__init__()
        _check_kind(kind)
        self.kind = kind
        self.model = model
        if kind == "timm":
            timm_vision.model_config(model)  # raises for a model that cannot be saved and rebuilt
            self._timm_stem = timm_vision.stem_names(model)
            default = preprocessing or timm_vision.data_preprocessing(model, self.image_size)
        else:
            default = preprocessing or ImagePreprocessing.default_for(kind, self.image_size)
        self.preprocessing = default

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """The images this tower expects (size, resize mode, filter, mean/std)."""
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: ImagePreprocessing) -> None:
        if not isinstance(value, ImagePreprocessing):
            raise TypeError(f"preprocessing must be an ImagePreprocessing, got {type(value).__name__}")
        if value.image_size != self.image_size:
            raise ValueError(f"preprocessing makes {value.image_size}-pixel images but the tower takes "
                             f"{self.image_size}")
        self._preprocessing = value

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, kind: str, config: dict[str, Any] | Any,
                    preprocessing: ImagePreprocessing | None = None) -> VisionTower:
        """A randomly initialised tower. ``config`` is a dict of the transformers config's fields
        (or a config object), for "timm" ``{"model_name", "model_args"}``; ``preprocessing`` defaults
        to the family's (see :class:`~llm2clip_fast.models.image_preprocessing.ImagePreprocessing`)."""
        _check_kind(kind)
        if kind == "timm":
            return cls(kind, timm_vision.create_timm_model(config), preprocessing)
        config_cls = _config_class(kind)
        if isinstance(config, dict):
            fields = {k: v for k, v in config.items() if k not in {"transformers_version", "model_type"}}
            config = config_cls(**fields)
        elif not isinstance(config, config_cls):
            raise TypeError(f"config for a {kind!r} tower must be a dict or {config_cls.__name__}, "
                            f"got {type(config).__name__}")
        return cls(kind, _model_from_config(kind, config), preprocessing)

    @classmethod
    def from_timm(cls, model_name: str, model_args: dict[str, Any] | None = None,
                  preprocessing: ImagePreprocessing | None = None) -> VisionTower:
        """A randomly initialised timm tower: ``timm.create_model(model_name, pretrained=False,
        num_classes=0, **model_args)`` (nothing is downloaded); preprocessing from timm's data config."""
        return cls.from_config("timm", {"model_name": model_name, "model_args": dict(model_args or {})},
                               preprocessing)

    @classmethod
    def from_preset(cls, name: str) -> VisionTower:
        """A randomly initialised tower of a named architecture (see :data:`VISION_PRESETS`)."""
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; known presets: {sorted(VISION_PRESETS)}")
        preset = VISION_PRESETS[name]
        return cls.from_config(preset["kind"], copy.deepcopy(preset["config"]))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VisionTower:
        """Load a tower with its weights from a local transformers folder.

        Accepts full CLIP / SigLIP checkpoints (the vision half is taken), their vision-only models,
        and ViT checkpoints.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"vision path {str(path)!r} has no config.json; expected a transformers "
                             f"model folder (CLIP, SigLIP or ViT)")
        model_type = json.loads(config_file.read_text()).get("model_type", "")
        from transformers import CLIPVisionModel, SiglipVisionModel, ViTModel

        if model_type in {"clip", "clip_vision_model"}:
            kind, model = "clip", CLIPVisionModel.from_pretrained(path)
        elif model_type in {"siglip", "siglip_vision_model"}:
            kind, model = "siglip", SiglipVisionModel.from_pretrained(path)
        elif model_type == "vit":
            kind, model = "vit", ViTModel.from_pretrained(path, add_pooling_layer=False)
        else:
            kind = model = None
        if model is not None:
            size = model.config.image_size
            size = int(size[0] if isinstance(size, (list, tuple)) else size)
            # the folder's image processor, as transformers' AutoImageProcessor would read it
            return cls(kind, model, ImagePreprocessing.from_hf_folder(path, kind, size))
        raise ValueError(f"vision path {str(path)!r} holds a {model_type!r} model; supported model types: "
                         "clip, clip_vision_model, siglip, siglip_vision_model, vit")

    def config_dict(self) -> dict[str, Any]:
        """What :meth:`from_config` needs to rebuild this tower: ``{"kind", "config", "preprocessing"}``."""
        if self.kind == "timm":
            return {"kind": self.kind, "config": timm_vision.model_config(self.model),
                    "preprocessing": self.preprocessing.to_dict()}
        cfg = self.model.config.to_dict()
        for k in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
            cfg.pop(k, None)
        return {"kind": self.kind, "config": cfg, "preprocessing": self.preprocessing.to_dict()}

    # -- geometry -----------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        if self.kind == "timm":
            return timm_vision.hidden_size(self.model)
        return int(self.model.config.hidden_size)

    @property
    def image_size(self) -> int:
        if self.kind == "timm":
            return timm_vision.image_size(self.model)
        size = self.model.config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def num_layers(self) -> int:
        if self.kind == "timm":
            return timm_vision.num_layers(self.model)
        return int(self.model.config.num_hidden_layers)

    def layer_id(self, param_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 for the stem (embeddings), ``i + 1`` for
        transformer layer ``i``, ``num_layers + 1`` for everything after the last layer (final norm,
        pooling head). ``param_name`` is relative to this tower (or to ``.model``)."""
        name = param_name.removeprefix("model.")
        if self.kind == "timm":
            return timm_vision.layer_id(name, self._timm_stem, self.num_layers)
        m = _LAYER_RE.search(name)
        if m:
            return int(m.group(1)) + 1
        if name.startswith(_STEM_PREFIXES):
            return 0
        return self.num_layers + 1

    def no_weight_decay_names(self) -> frozenset[str]:
        """Parameter names (relative to this tower) its own library keeps out of weight decay beyond
        biases and norms: for timm towers ``model.`` + ``no_weight_decay()`` (token and position tables,
        as timm and the official EVA02-CLIP recipe do); none for transformers towers, whose 3-d tables
        have always been decayed here."""
        if self.kind != "timm":
            return frozenset()
        return frozenset(f"model.{n}" for n in timm_vision.no_weight_decay(self.model))

    def layer_modules(self) -> nn.ModuleList | nn.Sequential:
        """The transformer layers, in order."""
        inner = self.model
        if self.kind == "timm":
            return inner.blocks
        if self.kind == "vit":
            layers = getattr(inner, "layers", None) or getattr(getattr(inner, "encoder", None), "layer", None)
        else:
            inner = getattr(inner, "vision_model", inner)
            layers = inner.encoder.layers
        if layers is None:
            raise RuntimeError(f"cannot find the transformer layers of this {self.kind!r} tower")
        return layers

    def freeze_layers(self, n: int) -> None:
        """Freeze the stem and the first ``n`` transformer layers (``n`` in ``0..num_layers``)."""
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"freeze_vision_layers must be in 0..{self.num_layers} for this tower, got {n}")
        if n == 0:
            return
        for name, p in self.named_parameters():
            if self.layer_id(name) <= n:
                p.requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool | int) -> None:
        """Recompute transformer layers' activations in backward instead of keeping them.

        ``True``: every layer (full); ``False`` or 0: none; an int ``k``: the first ``k`` layers (selective:
        the memory a checkpointed layer still holds is its input, so ``k`` trades ``k`` layers' activations
        for one extra forward of ``k`` layers). Non-reentrant ``torch.utils.checkpoint`` around each chosen
        layer's forward, so it composes with per-layer ``torch.compile`` (:meth:`compile_layers`) and
        replays dropout masks; parameter names and state dicts are unchanged.
        """
        layers = self.layer_modules()
        if isinstance(enabled, bool):
            count = len(layers) if enabled else 0
        elif isinstance(enabled, int) and 0 <= enabled <= len(layers):
            count = enabled
        else:
            raise ValueError(f"gradient checkpointing: True, False or a number of layers in 0..{len(layers)} "
                             f"for this tower, got {enabled!r}")
        # The library's own switches stay off: ours wraps each layer the same way for every family.
        if self.kind == "timm":
            self.model.set_grad_checkpointing(False)
        for i, layer in enumerate(layers):
            if hasattr(layer, "gradient_checkpointing"):  # transformers' GradientCheckpointingLayer
                layer.gradient_checkpointing = False
            if i < count:
                layer.forward = functools.partial(_checkpointed_forward, layer)
            else:
                layer.__dict__.pop("forward", None)
        self._checkpointed_layers = count

    @property
    def checkpointed_layers(self) -> int:
        """How many transformer layers recompute their activations in backward (the first ones)."""
        return getattr(self, "_checkpointed_layers", 0)

    def compile_layers(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` each transformer layer in place (``nn.Module.compile``): one graph per layer
        shape, shared by identical layers, so compilation takes seconds rather than the minutes a
        whole-model graph takes, and gradient checkpointing still applies per layer."""
        for layer in self.layer_modules():
            layer.compile(**compile_kwargs)
        self._compiled_layers = True

    @property
    def layers_compiled(self) -> bool:
        return bool(getattr(self, "_compiled_layers", False))

    # -- attention ----------------------------------------------------------------------------------

    def attention_shape(self, batch: int, device: torch.device | str, dtype: torch.dtype):
        """The :class:`~.attention_kernels.AttentionShape` of this tower's attention for ``batch`` images."""
        from .attention_kernels import AttentionShape

        heads, tokens, head_dim = self.attention_geometry()
        return AttentionShape(batch, heads, tokens, head_dim, torch.device(device).type,
                              str(dtype).replace("torch.", ""))

    def attention_geometry(self) -> tuple[int, int, int]:
        """(heads, tokens per image, head size) of the transformer layers' attention."""
        if self.kind == "timm":
            attn = self.layer_modules()[0].attn
            tokens = self.model.patch_embed.num_patches + int(getattr(self.model, "num_prefix_tokens", 0))
            return int(attn.num_heads), int(tokens), int(attn.head_dim)
        cfg = self.model.config
        heads = int(cfg.num_attention_heads)
        patches = (self.image_size // int(cfg.patch_size)) ** 2
        return heads, patches + (0 if self.kind == "siglip" else 1), int(cfg.hidden_size) // heads

    def set_attention_kernel(self, kernel: str | None) -> None:
        """Run the tower's attention on ``kernel`` (see :mod:`.attention_kernels`): an SDPA kernel
        ("flash", "cudnn", "efficient", "math") is pinned around each forward; "xformers" switches a
        transformers tower's attention implementation to xformers; None: SDPA chooses per call."""
        from .attention_kernels import KERNELS

        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"attention kernel must be one of {KERNELS} or None, got {kernel!r}")
        if self.kind != "timm":
            wanted = "xformers" if kernel == "xformers" else "sdpa"
            if self.model.config._attn_implementation != wanted:
                if wanted == "xformers":
                    from .xformers_attention import register_xformers_attention

                    register_xformers_attention()
                self.model.set_attn_implementation(wanted)
        elif kernel == "xformers":
            raise ValueError("a timm tower's attention calls SDPA only; xformers needs a transformers tower")
        self._attention_kernel = kernel

    @property
    def attention_kernel(self) -> str | None:
        """The pinned attention kernel (None: SDPA's own choice per call)."""
        return getattr(self, "_attention_kernel", None)

    # -- work ---------------------------------------------------------------------------------------

    def flops_per_image(self) -> dict[str, int]:
        """Model FLOPs of one image's forward pass, by the multiply-adds of its matrix products (x2):
        ``weights``: every Linear and the patch-embedding convolution, applied at each token (stem and
        pooling heads included: their Linear layers count at every token they see, an upper bound for
        attention-pooling heads that run on one query); ``attention``: ``QK^T`` and ``AV``, 4 x tokens^2
        x (heads x head size) per layer. Backward is twice the forward; recomputation is not counted."""
        heads, tokens, head_dim = self.attention_geometry()
        weights = 0
        for module in self.modules():
            if isinstance(module, nn.Linear):
                weights += 2 * tokens * module.in_features * module.out_features
            elif isinstance(module, nn.Conv2d):  # the patch embedding: one output per patch
                kh, kw = module.kernel_size
                per_patch = module.in_channels // module.groups * kh * kw * module.out_channels
                weights += 2 * (self.image_size // module.stride[0]) ** 2 * per_patch
        attention = 4 * tokens * tokens * heads * head_dim * self.num_layers
        return {"weights": weights, "attention": attention, "tokens": tokens}

    # -- compute ------------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` (B, C, S, S) float -> pooled features (B, hidden_size)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
        size = self.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])} pixels but this vision "
                             f"tower takes {size}x{size} images (set the data's image size to {size})")
        from .attention_kernels import pinned

        with pinned(self.attention_kernel):
            if self.kind == "timm":
                return timm_vision.pooled(self.model, pixel_values)
            out = self.model(pixel_values=pixel_values)
        if self.kind == "vit":
            return out.last_hidden_state[:, 0]
        return out.pooler_output


def _checkpointed_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A layer's own forward under non-reentrant activation checkpointing (installed as the layer
    instance's ``forward`` by :meth:`VisionTower.set_gradient_checkpointing`; a ``functools.partial``
    of the layer, so deep copies and pickles of the tower keep pointing at their own layer)."""
    if not torch.is_grad_enabled():
        return type(layer).forward(layer, *args, **kwargs)
    return checkpoint(type(layer).forward, layer, *args, use_reentrant=False, **kwargs)


def build_vision_tower(preset: str | None = None, path: str | Path | None = None,
                       timm: str | None = None) -> VisionTower:
    """A tower from exactly one of a preset name (random init), a local transformers folder or a timm
    model name (random init)."""
    if sum(v is not None for v in (preset, path, timm)) != 1:
        raise ValueError("give exactly one of a vision preset, a vision path and a timm model name "
                         f"(got preset={preset!r}, path={path!r}, timm={timm!r})")
    if preset is not None:
        return VisionTower.from_preset(preset)
    if timm is not None:
        return VisionTower.from_timm(timm)
    return VisionTower.from_pretrained(path)
