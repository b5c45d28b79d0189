# ruff: noqa: UP006, UP035, UP045, RUF013, RUF059  (kept as OpenCLIP writes it)
"""A transcription of OpenCLIP's ViT image tower, the ``--from open_clip`` conversion is tested against.

Source: the PyPI wheel ``open_clip_torch-3.3.0-py3-none-any.whl`` (MIT licence, Copyright (c) 2012-2021
Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar, John
Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi, Ludwig Schmidt):

- ``open_clip/transformer.py``: ``LayerNorm``, ``QuickGELU``, ``LayerScale``, ``ResidualAttentionBlock``,
  ``Transformer`` (its default-block branch and ``forward``), ``_expand_token``, ``VisionTransformer``
  (``__init__`` for a learnable position embedding without attentional pooling, ``_global_pool``,
  ``_embeds``, ``_pool``, ``forward``);
- ``open_clip/model.py``: the ViT branch of ``_build_vision_tower`` (``vision_cfg`` as a dict, the
  ``CLIPVisionCfg`` defaults it relies on written out in :data:`VISION_CFG_DEFAULTS`).

The bodies are copied statement for statement; left out are gradient checkpointing, ``lock``,
``forward_intermediates``, ``PatchDropout`` (identity at ``patch_dropout=0``, its default), the
custom-block (``qk_norm``, scaled-cosine ...) and attentional-pool branches and the fp16/bf16
``LayerNormFp32`` choice. :func:`clip_state_dict` adds the key names a full OpenCLIP ``CLIP`` stores
around ``visual.*`` (text tower, ``logit_scale``), built with the same ``Transformer`` class.
open_clip itself is not importable here (it needs torchvision), hence the transcription.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

OPEN_CLIP_VERSION = "3.3.0"


class LayerNorm(nn.LayerNorm):
    """Subclass torch's LayerNorm (with cast back to input dtype)."""

    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class QuickGELU(nn.Module):
    # NOTE This is slower than nn.GELU or nn.SiLU and uses more GPU memory
    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class ResidualAttentionBlock(nn.Module):
    def __init__(
            self,
            d_model: int,
            n_head: int,
            mlp_ratio: float = 4.0,
            ls_init_value: float = None,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = LayerNorm,
            is_cross_attention: bool = False,
            batch_first: bool = True,
    ):
        super().__init__()

        self.ln_1 = norm_layer(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=batch_first)
        self.ls_1 = LayerScale(d_model, ls_init_value) if ls_init_value is not None else nn.Identity()
        if is_cross_attention:
            self.ln_1_kv = norm_layer(d_model)

        self.ln_2 = norm_layer(d_model)
        mlp_width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(mlp_width, d_model))
        ]))
        self.ls_2 = LayerScale(d_model, ls_init_value) if ls_init_value is not None else nn.Identity()

    def attention(
            self,
            q_x: torch.Tensor,
            k_x: Optional[torch.Tensor] = None,
            v_x: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
    ):
        k_x = k_x if k_x is not None else q_x
        v_x = v_x if v_x is not None else q_x

        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(
            q_x, k_x, v_x,
            need_weights=False,
            attn_mask=attn_mask
        )[0]

    def forward(
            self,
            q_x: torch.Tensor,
            k_x: Optional[torch.Tensor] = None,
            v_x: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
    ):
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x


class Transformer(nn.Module):
    def __init__(
            self,
            width: int,
            layers: int,
            heads: int,
            mlp_ratio: float = 4.0,
            ls_init_value: float = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = LayerNorm,
            batch_first: bool = True,
    ):
        super().__init__()
        self.width = width
        self.layers = layers
        self.batch_first = batch_first
        self.grad_checkpointing = False

        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(
                width,
                heads,
                mlp_ratio,
                ls_init_value=ls_init_value,
                act_layer=act_layer,
                norm_layer=norm_layer,
                batch_first=batch_first,
            )
            for _ in range(layers)
        ])

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        if not self.batch_first:
            x = x.transpose(0, 1).contiguous()    # NLD -> LND

        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)

        if not self.batch_first:
            x = x.transpose(0, 1)    # LND -> NLD
        return x


def _expand_token(token, batch_size: int):
    return token.view(1, 1, -1).expand(batch_size, -1, -1)


class VisionTransformer(nn.Module):
    def __init__(
            self,
            image_size: int,
            patch_size: int,
            width: int,
            layers: int,
            heads: int,
            mlp_ratio: float,
            ls_init_value: float = None,
            output_dim: int = 512,
            no_ln_pre: bool = False,
            pool_type: str = 'tok',
            final_ln_after_pool: bool = False,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = LayerNorm,
    ):
        super().__init__()
        assert pool_type in ('tok', 'avg', 'none')
        image_height, image_width = self.image_size = (image_size, image_size)
        patch_height, patch_width = self.patch_size = (patch_size, patch_size)
        self.grid_size = (image_height // patch_height, image_width // patch_width)
        self.final_ln_after_pool = final_ln_after_pool  # currently ignored w/ attn pool enabled
        self.output_dim = output_dim

        self.conv1 = nn.Conv2d(
            in_channels=3,
            out_channels=width,
            kernel_size=patch_size,
            stride=patch_size,
            bias=False,
        )

        # class embeddings and positional embeddings
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))

        # setting a patch_dropout of 0. would mean it is disabled and this function would be the identity fn
        self.patch_dropout = nn.Identity()

        self.ln_pre = nn.Identity() if no_ln_pre else norm_layer(width)
        self.transformer = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            ls_init_value=ls_init_value,
            act_layer=act_layer,
            norm_layer=norm_layer,
        )

        self.attn_pool = None
        pool_dim = width
        self.pool_type = pool_type

        self.ln_post = norm_layer(pool_dim)
        self.proj = nn.Parameter(scale * torch.randn(pool_dim, output_dim))

    def _global_pool(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.pool_type == 'avg':
            pooled, tokens = x[:, 1:].mean(dim=1), x[:, 1:]
        elif self.pool_type == 'tok':
            pooled, tokens = x[:, 0], x[:, 1:]
        else:
            pooled = tokens = x

        return pooled, tokens

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # shape = [*, dim, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # shape = [*, width, grid ** 2]
        x = x.permute(0, 2, 1)  # shape = [*, grid ** 2, width]

        # class embeddings and positional embeddings
        x = torch.cat([_expand_token(self.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
        # shape = [*, grid ** 2 + 1, width]
        x = x + self.positional_embedding.to(x.dtype)

        # patch dropout (if active)
        x = self.patch_dropout(x)

        # apply norm before transformer
        x = self.ln_pre(x)
        return x

    def _pool(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            pooled = self.ln_post(pooled)
        else:
            x = self.ln_post(x)
            pooled, tokens = self._global_pool(x)

        return pooled, tokens

    def forward(self, x: torch.Tensor):
        x = self._embeds(x)
        x = self.transformer(x)
        pooled, tokens = self._pool(x)

        if self.proj is not None:
            pooled = pooled @ self.proj

        return pooled


# CLIPVisionCfg's defaults for the fields the ViT branch below reads.
VISION_CFG_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                       "image_size": 224, "ls_init_value": None, "no_ln_pre": False,
                       "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None,
                       "norm_kwargs": None}


def build_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool = False) -> VisionTransformer:
    """``open_clip.model._build_vision_tower`` for a ViT ``vision_cfg`` in float32 (``cast_dtype=None``)."""
    cfg = {**VISION_CFG_DEFAULTS, **vision_cfg}
    # OpenAI models are pretrained w/ QuickGELU but native nn.GELU is both faster and more
    # memory efficient in recent PyTorch releases (>= 1.10).
    act_layer = QuickGELU if quick_gelu else nn.GELU

    vision_heads = cfg["width"] // cfg["head_width"]
    norm_layer = LayerNorm
    if cfg["norm_kwargs"]:
        norm_layer = partial(norm_layer, **cfg["norm_kwargs"])
    if cfg["act_kwargs"] is not None:
        act_layer = partial(act_layer, **cfg["act_kwargs"])

    return VisionTransformer(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=cfg["width"],
        layers=cfg["layers"],
        heads=vision_heads,
        mlp_ratio=cfg["mlp_ratio"],
        ls_init_value=cfg["ls_init_value"],
        no_ln_pre=cfg["no_ln_pre"],
        final_ln_after_pool=cfg["final_ln_after_pool"],
        pool_type=cfg["pool_type"],
        output_dim=embed_dim,
        act_layer=act_layer,
        norm_layer=norm_layer,
    )


def clip_state_dict(visual: VisionTransformer, text_width: int = 16, text_layers: int = 1,
                    vocab_size: int = 40, context_length: int = 6) -> dict[str, torch.Tensor]:
    """The state dict of an OpenCLIP ``CLIP`` holding ``visual``: ``visual.*`` plus the text tower's
    entries (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``,
    ``text_projection``) and ``logit_scale``, under the names ``CLIP.__init__`` gives them."""
    text = Transformer(text_width, text_layers, heads=2)
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state["token_embedding.weight"] = torch.randn(vocab_size, text_width)
    state["positional_embedding"] = torch.randn(context_length, text_width)
    state.update({f"transformer.{k}": v for k, v in text.state_dict().items()})
    state["ln_final.weight"], state["ln_final.bias"] = torch.ones(text_width), torch.zeros(text_width)
    state["text_projection"] = torch.randn(text_width, visual.output_dim)
    state["logit_scale"] = torch.ones([]) * 4.6052
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
