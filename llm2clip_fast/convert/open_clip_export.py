"""``--to open_clip``: the vision side of one of our :class:`LLM2CLIPModel` folders as OpenCLIP stores it.

Writes ``FILE`` (safetensors): ``visual.*`` under OpenCLIP's ViT names (q/k/v packed back into
``attn.in_proj_weight``/``bias``, ``visual.proj`` = our ``visual_projection.weight`` transposed), plus
``logit_scale`` (and ``logit_bias`` for a SigLIP-loss model); and ``open_clip_config.json`` beside it:
``model_cfg`` (``embed_dim``, ``quick_gelu``, ``vision_cfg``; no ``text_cfg``, the text side being the
LLM and our adapter) and ``preprocess_cfg`` (the tower's preprocessing). Naming ``FILE``
``open_clip_model.safetensors`` makes its folder an OpenCLIP hub-style folder, which ``--from open_clip``
reads back. OpenCLIP code loads the vision side with::

    visual = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg["quick_gelu"])
    visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})

Only a transformers CLIP tower (kind "clip") with GELU or QuickGELU has an OpenCLIP equivalent. Key
layout: :mod:`llm2clip_fast.convert.open_clip_keys` (open_clip_torch 3.3.0). Both files are written
atomically; existing ones are replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import write_json_atomic, write_path_atomic
from ..models.llm2clip import LLM2CLIPModel
from ..writable_output import check_writable
from .errors import OutputExistsError
from .open_clip_keys import ACTIVATIONS, CONFIG_NAME, PROJ_KEY, OpenClipVisionGeometry, open_clip_from_hf

_ACT_OF_HIDDEN_ACT = {v: k for k, v in ACTIVATIONS.items()}


def export_paths(out: str | os.PathLike[str], overwrite: bool) -> tuple[Path, Path]:
    """``(weights file, config file)`` for ``--out``, refusing existing ones unless ``overwrite``."""
    weights = Path(out)
    if weights.suffix != ".safetensors":
        raise ValueError(f"--to open_clip writes a safetensors file: --out must end in .safetensors, got "
                         f"{str(out)!r} (e.g. DIR/open_clip_model.safetensors)")
    config = weights.with_name(CONFIG_NAME)
    for path in (weights, config):
        if path.is_dir():
            raise OutputExistsError(f"{str(path)!r} is a folder; refusing to replace it with a file")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{str(path)!r} already exists; pass --overwrite to replace it")
    check_writable(weights, flag="--out", folder=False)
    return weights, config


def open_clip_export(model: LLM2CLIPModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The OpenCLIP state dict of ``model``'s vision side and its ``open_clip_config.json`` content."""
    tower = model.vision
    if tower.kind != "clip":
        raise ValueError(f"the model's vision tower is a {tower.kind!r} tower; only transformers CLIP towers "
                         "(kind 'clip') have an OpenCLIP ViT equivalent")
    if model.visual_projection.bias is not None:
        raise ValueError("the model's visual projection has a bias (projection_bias); OpenCLIP's visual.proj "
                         "has none")
    cfg = tower.model.config
    act = _ACT_OF_HIDDEN_ACT.get(cfg.hidden_act)
    if act is None:
        raise ValueError(f"the vision tower's activation {cfg.hidden_act!r} has no OpenCLIP equivalent "
                         f"(OpenCLIP ViTs use {sorted(ACTIVATIONS.values())})")
    if cfg.num_channels != 3:
        raise ValueError(f"the vision tower takes {cfg.num_channels} channels; OpenCLIP's conv1 takes 3")
    geometry = OpenClipVisionGeometry(width=tower.hidden_size, layers=tower.num_layers,
                                      heads=int(cfg.num_attention_heads), patch_size=int(cfg.patch_size),
                                      image_size=tower.image_size, mlp_width=int(cfg.intermediate_size),
                                      act=act, layer_norm_eps=float(cfg.layer_norm_eps),
                                      embed_dim=model.embed_dim)
    if geometry.width % geometry.heads:
        raise ValueError(f"{geometry.heads} heads do not divide the width {geometry.width}")
    state = open_clip_from_hf(tower.model.state_dict(), geometry.layers)
    state[PROJ_KEY] = model.visual_projection.weight.detach().T
    state["logit_scale"] = model.logit_scale.detach()
    model_cfg: dict[str, Any] = {"embed_dim": geometry.embed_dim, "quick_gelu": act == "quick_gelu",
                                 "vision_cfg": geometry.vision_cfg()}
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach()
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    config = {"model_cfg": model_cfg, "preprocess_cfg": tower.preprocessing.to_open_clip()}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, config


def export_open_clip(source: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False,
                     dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """Write the OpenCLIP files of the LLM2CLIPModel folder ``source`` (see the module docstring);
    returns ``(weights file, config file)``."""
    from safetensors.torch import save_file

    weights, config_file = export_paths(out, overwrite)
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"--to open_clip source {str(source)!r} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"--to open_clip source {str(source)!r} is not a folder (an LLM2CLIPModel "
                                 "folder: config.json + model.safetensors)")
    model = LLM2CLIPModel.from_pretrained(src)
    state, config = open_clip_export(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config["exported_from"] = {"llm2clip_fast_model": str(src.resolve()),
                               "open_clip_code": "open_clip_torch 3.3.0 (VisionTransformer key layout)"}
    weights.parent.mkdir(parents=True, exist_ok=True)
    export_paths(out, overwrite)  # nothing appeared meanwhile
    write_path_atomic(weights, lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_json_atomic(config_file, config)
    return weights, config_file
