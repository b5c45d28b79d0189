"""OpenCLIP's ViT image tower (``visual.*``) and transformers' ``CLIPVisionModel``: the same network under
two sets of names.

Matched against ``open_clip_torch`` 3.3.0 (PyPI wheel), ``open_clip/transformer.py``
(``VisionTransformer``, ``ResidualAttentionBlock``, ``Transformer``) and ``open_clip/model.py``
(``CLIPVisionCfg``, ``_build_vision_tower``)::

    VisionTransformer.forward(x):
        x = conv1(x) -> (B, grid*grid, width)              # Conv2d(3, width, patch, stride=patch, bias=False)
        x = cat([class_embedding, x]) + positional_embedding
        x = ln_pre(x)
        x = transformer(x)                                 # resblocks, batch first, no attn_mask
        pooled = ln_post(x)[:, 0]                          # pool_type 'tok' (= ln_post(x[:, 0]))
        return pooled @ proj                               # proj: (width, embed_dim)
    ResidualAttentionBlock.forward(x):
        x = x + attn(ln_1(x))                              # nn.MultiheadAttention: in_proj_weight (3w, w)
        x = x + mlp.c_proj(act(mlp.c_fc(ln_2(x))))         #   = [q; k; v] rows, out_proj
    act = QuickGELU if quick_gelu else nn.GELU; heads = width // head_width (default 64);
    mlp width = int(width * mlp_ratio); LayerNorm eps 1e-5 unless vision_cfg.norm_kwargs says otherwise

which is transformers' CLIP vision transformer (``embeddings``, ``pre_layrnorm``, ``encoder.layers.i``,
``post_layernorm``, pooled = post-LayerNorm of the class token) with q/k/v as three Linear layers and
the projection stored transposed (``visual_projection.weight`` = ``proj.T``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SourceMismatchError

CONFIG_NAME = "open_clip_config.json"  # beside the weights in an OpenCLIP hub folder
VISUAL = "visual."
PROJ_KEY = "visual.proj"
BLOCK = "visual.transformer.resblocks."
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # ours (--act) -> transformers' hidden_act
DEFAULT_HEAD_WIDTH = 64  # CLIPVisionCfg.head_width
DEFAULT_LAYER_NORM_EPS = 1e-5

_STEM = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PACKED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
QKV = ("q", "k", "v")
_BLOCK_RE = re.compile(re.escape(BLOCK) + r"(\d+)\.")


@dataclass(frozen=True)
class OpenClipVisionGeometry:
    """An OpenCLIP ViT tower's architecture. ``act``: "quick_gelu" or "gelu"; ``embed_dim``: the output
    size of ``visual.proj`` (None when the source has none)."""

    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    mlp_width: int
    act: str
    layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS
    embed_dim: int | None = None

    def hf_config(self) -> dict[str, Any]:
        """The transformers ``CLIPVisionConfig`` fields of the same tower."""
        return {"hidden_size": self.width, "intermediate_size": self.mlp_width,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": 3,
                "hidden_act": ACTIVATIONS[self.act], "layer_norm_eps": self.layer_norm_eps}

    def vision_cfg(self) -> dict[str, Any]:
        """OpenCLIP's ``vision_cfg`` (``CLIPVisionCfg`` fields) that builds this tower."""
        cfg: dict[str, Any] = {"image_size": self.image_size, "layers": self.layers, "width": self.width,
                               "head_width": self.width // self.heads,
                               "mlp_ratio": mlp_ratio_for(self.width, self.mlp_width),
                               "patch_size": self.patch_size}
        if self.layer_norm_eps != DEFAULT_LAYER_NORM_EPS:
            cfg["norm_kwargs"] = {"eps": self.layer_norm_eps}
        return cfg


def mlp_ratio_for(width: int, mlp_width: int) -> float:
    """The smallest float ``r`` >= mlp_width / width with ``int(width * r) == mlp_width``, which is how
    OpenCLIP sizes the MLP (e.g. ViT-bigG: 8192 / 1664)."""
    ratio = mlp_width / width
    for _ in range(8):
        if int(width * ratio) == mlp_width:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise ValueError(f"no mlp_ratio gives an MLP of {mlp_width} features at width {width}")


def hf_names(layers: int) -> dict[str, str]:
    """``{OpenCLIP key: transformers CLIPVisionModel name}`` for every one-to-one tensor of the tower
    (``vision_model.`` prefix left out; q/k/v and ``proj`` are not one-to-one, see :func:`packed_names`)."""
    names = {VISUAL + k: v for k, v in _STEM.items()}
    for i in range(layers):
        for k, v in _LAYER.items():
            names[f"{BLOCK}{i}.{k}"] = f"encoder.layers.{i}.{v}"
    return names


def packed_names(layers: int) -> dict[str, tuple[str, str, str]]:
    """``{OpenCLIP in_proj key: (q, k, v transformers names)}``: the packed attention input projection
    holds q, k and v as consecutive row blocks of ``width`` rows."""
    names = {}
    for i in range(layers):
        for k, kind in _PACKED.items():
            names[f"{BLOCK}{i}.{k}"] = tuple(f"encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in QKV)
    return names


def is_packed(key: str) -> bool:
    return key.startswith(BLOCK) and key.endswith(tuple("." + k for k in _PACKED))


def block_count(keys: list[str] | Mapping[str, Any]) -> int:
    """1 + the highest ``visual.transformer.resblocks.i`` index (0 when there is none)."""
    indices = [int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))]
    return max(indices) + 1 if indices else 0


def geometry_from_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, int | None]:
    """What the tensors fix: width, patch_size, image_size, layers, mlp_width, embed_dim (None without
    ``visual.proj``). Heads and the activation are not in any shape. SourceMismatchError when a tensor
    it needs is absent or not shaped as OpenCLIP's."""
    def need(key: str, dims: int) -> torch.Tensor:
        if key not in state:
            raise SourceMismatchError(f"no {key}: not an OpenCLIP ViT image tower (expected visual.conv1, "
                                      "visual.positional_embedding, visual.transformer.resblocks.*)")
        value = state[key]
        if value.dim() != dims:
            raise SourceMismatchError(f"{key} has shape {tuple(value.shape)}, expected {dims} dimensions")
        return value

    conv = need(VISUAL + "conv1.weight", 4)
    width, channels, ph, pw = (int(s) for s in conv.shape)
    if ph != pw or channels != 3:
        raise SourceMismatchError(f"visual.conv1.weight {tuple(conv.shape)}: expected (width, 3, patch, "
                                  "patch) with square patches")
    positions = int(need(VISUAL + "positional_embedding", 2).shape[0])
    grid = math.isqrt(max(positions - 1, 0))
    if grid < 1 or grid * grid != positions - 1:
        raise SourceMismatchError(f"visual.positional_embedding has {positions} rows, not 1 + a square "
                                  "grid of patches (only square images are supported)")
    layers = block_count(list(state))
    if layers == 0:
        raise SourceMismatchError(f"no {BLOCK}* tensors: not an OpenCLIP ViT image tower")
    mlp_width = int(need(f"{BLOCK}0.mlp.c_fc.weight", 2).shape[0])
    proj = state.get(PROJ_KEY)
    embed_dim = int(proj.shape[1]) if proj is not None and proj.dim() == 2 else None
    return {"width": width, "patch_size": ph, "image_size": grid * ph, "layers": layers,
            "mlp_width": mlp_width, "embed_dim": embed_dim}


def open_clip_from_hf(tower: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The ``visual.*`` entries (without ``proj``) of a transformers CLIP vision tower's state dict
    ``tower`` (names with or without ``vision_model.``): renamed, q/k/v packed into ``in_proj``.
    ValueError listing the tower entries left over or absent (the tower is not a plain CLIP ViT)."""
    plain = {k.removeprefix("vision_model."): v for k, v in tower.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    absent: list[str] = []
    for theirs, ours in hf_names(layers).items():
        if ours in plain:
            out[theirs] = plain[ours]
            used.add(ours)
        else:
            absent.append(ours)
    for theirs, parts in packed_names(layers).items():
        if all(p in plain for p in parts):
            out[theirs] = torch.cat([plain[p] for p in parts], dim=0)
            used.update(parts)
        else:
            absent.extend(p for p in parts if p not in plain)
    left = sorted(set(plain) - used - {"embeddings.position_ids"})
    if absent or left:
        raise ValueError(f"the vision tower is not a plain CLIP ViT as OpenCLIP builds it: entries it lacks "
                         f"{absent[:10]}, entries OpenCLIP has no place for {left[:10]}")
    return out
