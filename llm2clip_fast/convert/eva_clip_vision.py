"""The ``visual.*`` EVA02 tower of an EVA-CLIP-style state dict, mapped onto timm's ``Eva``.

Matched against microsoft/LLM2CLIP at commit cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a
(``llm2clip/eva_clip/eva_vit_model.py`` ``EVAVisionTransformer``, ``rope.py``
``VisionRotaryEmbeddingFast``, ``model.py`` ``_build_vision_tower``) and timm 1.0.31
``timm/models/eva.py`` (``Eva``; its ``checkpoint_filter_fn`` knows the same renames). An EVA02-CLIP
tower as the official model configs build it (``rope``, ``intp_freq``, ``naiveswiglu``, ``subln``,
class-token pooling, every LayerNorm eps 1e-6) is timm's ``Eva`` with ``qkv_fused=False``,
``swiglu_mlp``, ``scale_mlp``, ``scale_attn_inner``, ``use_rot_pos_emb``, ``ref_feat_shape`` =
``(pt_hw_seq_len,) * 2`` and ``global_pool='token'``; key by key::

    patch_embed.proj, cls_token, pos_embed, norm          same names
    blocks.N.norm1 / norm2, attn.q_proj / k_proj / v_proj / proj          same names
    blocks.N.attn.inner_attn_ln                            blocks.N.attn.norm
    blocks.N.mlp.w1 / w2 / ffn_ln / w3                     blocks.N.mlp.fc1_g / fc1_x / norm / fc2
    blocks.N.attn.q_bias / v_bias (baaivision EVA-CLIP)    blocks.N.attn.q_proj.bias / v_proj.bias
    head (Linear width -> embed_dim, with bias)            our visual_projection

The RoPE tables (``rope.freqs_cos``/``freqs_sin``, repeated under every ``blocks.N.attn.rope``) are
fixed functions of the geometry, not learned: where present they must equal timm's, which checks
``pt_hw_seq_len``, ``intp_freq`` and the image size; they are not copied.

Heads and the MLP ratio are not in any tensor shape, so the geometry comes from an official model
config: one of :data:`EVA02_CLIP_CONFIGS` (transcribed from ``llm2clip/eva_clip/model_configs/``) or a
model-config JSON in the same format.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SourceMismatchError

VISION_PREFIX = "visual."
OFFICIAL_COMMIT = "cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a"
# model_configs/EVA02-CLIP-*.json at OFFICIAL_COMMIT: embed_dim and vision_cfg (the text_cfg is the LLM's).
EVA02_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "EVA02-CLIP-B-16": {"embed_dim": 1280, "vision_cfg": {
        "image_size": 224, "layers": 12, "width": 768, "head_width": 64, "patch_size": 16,
        "mlp_ratio": 2.6667,
        "eva_model_name": "eva-clip-b-16-X", "drop_path_rate": 0.0, "xattn": True, "fusedLN": True,
        "rope": True, "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True}},
    "EVA02-CLIP-L-14": {"embed_dim": 1280, "vision_cfg": {
        "image_size": 224, "layers": 24, "width": 1024, "drop_path_rate": 0, "head_width": 64,
        "mlp_ratio": 2.6667, "patch_size": 14, "eva_model_name": "eva-clip-l-14", "xattn": True,
        "fusedLN": True, "rope": True, "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True,
        "subln": True}},
    "EVA02-CLIP-L-14-336": {"embed_dim": 1280, "vision_cfg": {
        "image_size": 336, "layers": 24, "width": 1024, "drop_path_rate": 0, "head_width": 64,
        "mlp_ratio": 2.6667, "patch_size": 14, "eva_model_name": "eva-clip-l-14-336", "xattn": True,
        "fusedLN": True, "rope": True, "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True,
        "subln": True}},
}
# timm's registered EVA02-CLIP architecture of each named config (its model_args are set in full anyway).
TIMM_NAMES = {"EVA02-CLIP-B-16": "eva02_base_patch16_clip_224",
              "EVA02-CLIP-L-14": "eva02_large_patch14_clip_224",
              "EVA02-CLIP-L-14-336": "eva02_large_patch14_clip_336"}
DEFAULT_TIMM_NAME = "eva02_base_patch16_clip_224"

# CLIPVisionCfg (model.py) defaults, and the values an EVA02 tower must have for timm's Eva to match it.
_CFG_DEFAULTS: dict[str, Any] = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
    "ls_init_value": None, "patch_dropout": 0.0, "global_average_pool": False, "drop_path_rate": None,
    "qkv_bias": True, "fusedLN": False, "xattn": False, "postnorm": False, "rope": False, "pt_hw_seq_len": 16,
    "intp_freq": False, "naiveswiglu": False, "subln": False, "eva_model_name": None,
}
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "rope": (True,), "naiveswiglu": (True,), "subln": (True,), "postnorm": (False,), "ls_init_value": (None,),
    "global_average_pool": (False,), "qkv_bias": (True,),
}
# Training-only (drop_path_rate, patch_dropout) or same arithmetic (xattn: xformers attention; fusedLN:
# apex's LayerNorm, eps 1e-6 either way).
_IGNORED = ("drop_path_rate", "patch_dropout", "xattn", "fusedLN", "eva_model_name")
_BLOCK_RE = re.compile(r"^visual\.blocks\.(\d+)\.")
_RENAMES = (("attn.inner_attn_ln.", "attn.norm."), ("mlp.w1.", "mlp.fc1_g."), ("mlp.w2.", "mlp.fc1_x."),
            ("mlp.ffn_ln.", "mlp.norm."), ("mlp.w3.", "mlp.fc2."))
_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
               "attn.inner_attn_ln.weight", "attn.inner_attn_ln.bias", "attn.proj.weight", "attn.proj.bias",
               "norm2.weight", "norm2.bias", "mlp.w1.weight", "mlp.w1.bias", "mlp.w2.weight", "mlp.w2.bias",
               "mlp.ffn_ln.weight", "mlp.ffn_ln.bias", "mlp.w3.weight", "mlp.w3.bias")
_TOP_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias")
ROPE_TABLES = ("freqs_cos", "freqs_sin")


@dataclass(frozen=True)
class EvaVisionGeometry:
    """An EVA02-CLIP tower's architecture (from an official model config) and the embedding size."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    pt_hw_seq_len: int
    embed_dim: int
    timm_name: str

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)  # as both the official Block and timm's EvaBlock size it

    def timm_config(self) -> dict[str, Any]:
        """The timm tower config (``{"model_name", "model_args"}``) that builds this tower."""
        return {"model_name": self.timm_name, "model_args": {
            "img_size": self.image_size, "patch_size": self.patch_size, "embed_dim": self.width,
            "depth": self.layers, "num_heads": self.heads, "mlp_ratio": self.mlp_ratio, "qkv_fused": False,
            "swiglu_mlp": True, "scale_mlp": True, "scale_attn_inner": True, "use_rot_pos_emb": True,
            "ref_feat_shape": [self.pt_hw_seq_len, self.pt_hw_seq_len], "global_pool": "token"}}


def geometry_from_model_config(config: Mapping[str, Any], where: str,
                               timm_name: str = DEFAULT_TIMM_NAME) -> EvaVisionGeometry:
    """The geometry of an official model config (``{"embed_dim", "vision_cfg": {...}}``); ValueError naming
    what timm's Eva would not reproduce."""
    vision = config.get("vision_cfg")
    if not isinstance(vision, dict) or "embed_dim" not in config:
        raise ValueError(f"{where}: an EVA-CLIP model config needs 'embed_dim' and a 'vision_cfg' object")
    unknown = sorted(set(vision) - set(_CFG_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: vision_cfg fields the official CLIPVisionCfg has no EVA meaning for: "
                         f"{unknown}")
    cfg = {**_CFG_DEFAULTS, **vision}
    if not cfg["eva_model_name"]:
        raise ValueError(f"{where}: vision_cfg has no eva_model_name, so the official code builds no EVA "
                         "tower")
    wrong = [f"{k}={cfg[k]!r} (needs {' or '.join(map(repr, allowed))})" for k, allowed in _REQUIRED.items()
             if cfg[k] not in allowed]
    ints = {k: cfg[k] for k in ("layers", "width", "head_width", "patch_size", "image_size", "pt_hw_seq_len")}
    bad_ints = [k for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad_ints:
        raise ValueError(f"{where}: vision_cfg {bad_ints} must be positive integers (got "
                         f"{ {k: ints[k] for k in bad_ints} })")
    if ints["width"] % ints["head_width"]:
        wrong.append(f"width {ints['width']} not a multiple of head_width {ints['head_width']}")
    grid = ints["image_size"] // ints["patch_size"]
    if not cfg["intp_freq"] and grid != ints["pt_hw_seq_len"]:
        wrong.append(f"intp_freq=False with a {grid}x{grid} patch grid != pt_hw_seq_len "
                     f"{ints['pt_hw_seq_len']} "
                     "(the official RoPE table would not fit either)")
    if wrong:
        raise ValueError(f"{where}: not an EVA02-CLIP tower that timm's Eva reproduces: {'; '.join(wrong)}")
    return EvaVisionGeometry(image_size=ints["image_size"], patch_size=ints["patch_size"],
                             width=ints["width"],
                             layers=ints["layers"], heads=ints["width"] // ints["head_width"],
                             mlp_ratio=float(cfg["mlp_ratio"]), pt_hw_seq_len=ints["pt_hw_seq_len"],
                             embed_dim=int(config["embed_dim"]), timm_name=timm_name)


def named_geometry(name: str) -> EvaVisionGeometry:
    """The geometry of one of :data:`EVA02_CLIP_CONFIGS`."""
    if name not in EVA02_CLIP_CONFIGS:
        raise ValueError(f"unknown EVA-CLIP model {name!r}; known: {sorted(EVA02_CLIP_CONFIGS)} (or pass "
                         "--model-config JSON in the official model_configs format)")
    return geometry_from_model_config(copy.deepcopy(EVA02_CLIP_CONFIGS[name]), name, TIMM_NAMES[name])


def infer_named_model(state: Mapping[str, torch.Tensor], check_head: bool = True) -> str | None:
    """The named config whose readable sizes (width, depth, patch, image size and, with ``check_head``,
    embed_dim) match the tensors, None when none or several do. A plain EVA-CLIP file is matched without
    its head (``check_head=False``): its CLIP head (EVA02-CLIP-L: 768) is not the LLM2CLIP config's."""
    patch = state.get(VISION_PREFIX + "patch_embed.proj.weight")
    pos = state.get(VISION_PREFIX + "pos_embed")
    head = state.get(VISION_PREFIX + "head.weight")
    if patch is None or pos is None or (check_head and head is None) or patch.dim() != 4 or pos.dim() != 3:
        return None
    layers = len({m.group(1) for k in state if (m := _BLOCK_RE.match(k))})
    found = []
    for name in EVA02_CLIP_CONFIGS:
        g = named_geometry(name)
        head_fits = not check_head or (head is not None and head.shape[0] == g.embed_dim)
        if head_fits and (patch.shape[0], patch.shape[-1], pos.shape[1], layers) == (
                g.width, g.patch_size, g.grid * g.grid + 1, g.layers):
            found.append(name)
    return found[0] if len(found) == 1 else None


def uses_separate_qv_bias(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the source stores the q/v biases as ``attn.q_bias``/``v_bias`` (baaivision EVA-CLIP) rather
    than ``attn.q_proj.bias``/``v_proj.bias`` (LLM2CLIP, whose load_checkpoint renames them)."""
    return any(k.startswith(VISION_PREFIX + "blocks.") and k.endswith(".attn.q_bias") for k in state)


def vision_plan(geometry: EvaVisionGeometry, separate_qv_bias: bool,
                target_prefix: str = "vision.model.") -> dict[str, str]:
    """``{source key: our key}`` for every learned tensor of the tower and its head."""
    plan: dict[str, str] = {}
    for key in _TOP_KEYS:
        plan[VISION_PREFIX + key] = target_prefix + key
    if separate_qv_bias:
        bias_keys = (("attn.q_bias", "attn.q_proj.bias"), ("attn.v_bias", "attn.v_proj.bias"))
    else:
        bias_keys = (("attn.q_proj.bias", "attn.q_proj.bias"), ("attn.v_proj.bias", "attn.v_proj.bias"))
    for i in range(geometry.layers):
        pairs = [(key, key) for key in _BLOCK_KEYS] + list(bias_keys)
        for theirs, ours in pairs:
            for old, new in _RENAMES:
                ours = ours.replace(old, new)
            plan[f"{VISION_PREFIX}blocks.{i}.{theirs}"] = f"{target_prefix}blocks.{i}.{ours}"
    plan[VISION_PREFIX + "head.weight"] = "visual_projection.weight"
    plan[VISION_PREFIX + "head.bias"] = "visual_projection.bias"
    return plan


def is_rope_table(key: str) -> bool:
    return key.startswith(VISION_PREFIX) and key.rsplit(".", 1)[-1] in ROPE_TABLES and ".rope." in f".{key}"


def check_rope_tables(state: Mapping[str, torch.Tensor], rope_embed: torch.Tensor, where: str) -> list[str]:
    """Compare the source's RoPE tables with timm's (``rope.get_embed()``: sin then cos, each
    (grid², head_dim)); returns the table keys found. SourceMismatchError when one differs."""
    sin, cos = rope_embed.float().tensor_split(2, dim=-1)
    expected = {"freqs_sin": sin, "freqs_cos": cos}
    found = sorted(k for k in state if is_rope_table(k))
    bad = []
    for key in found:
        table, want = state[key], expected[key.rsplit(".", 1)[-1]]
        # the tables are stored in the checkpoint's dtype: compare at that precision
        tol = 1e-5 if table.dtype == torch.float32 else 1e-2
        same_shape = tuple(table.shape) == tuple(want.shape)
        if not same_shape or not torch.allclose(table.float(), want, atol=tol, rtol=0):
            bad.append(f"{key} {tuple(table.shape)}")
    if bad:
        raise SourceMismatchError(f"{where}: RoPE tables that do not match the model config's geometry "
                                  f"(image size, patch size, heads, pt_hw_seq_len, intp_freq): {bad[:4]}; "
                                  f"expected {tuple(sin.shape)} tables equal to timm's for that geometry")
    return found
