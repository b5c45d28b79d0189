"""``--from eva-clip``: an EVA-CLIP-style LLM2CLIP state dict (as the official repository trains it).

The official ``CustomCLIP`` (microsoft/LLM2CLIP ``llm2clip/eva_clip/model.py``, commit
cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a) holds

- ``visual``: an EVA02 ViT (RoPE, SwiGLU, sub-LN), which becomes a timm ``Eva`` tower (kind "timm"; the
  key mapping and the geometry: :mod:`llm2clip_fast.convert.eva_clip_vision`), its ``visual.head``
  (Linear width -> embed_dim, with bias) our ``visual_projection`` (``projection_bias``);
- ``text``: a ``TextProj`` (keys ``text.text_adaptor.{0..n-1}.fn.{0,3}`` / ``.ln``, ``.n`` LayerNorm,
  ``.n+1`` Linear). On cached embeddings ``CustomCLIP.encode_text`` calls ``TextProj.forward(x)`` with
  its default ``l2_norm=True``, hence ``input_norm="l2"`` by default here (unlike the HF releases,
  whose ``get_text_features`` skips it);
- ``logit_scale``.

The image preprocessing is the official eval transform (``transform.py`` ``image_transform``: resize the
short side to the image size, bicubic, centre crop, OpenAI CLIP mean/std), which is not timm's data
config for these names (that one crops 0.9 at 224). The file is a ``.safetensors`` or a pickle read
with ``torch.load(weights_only=True)`` (no code from it runs), optionally wrapped in ``model``,
``module`` or ``state_dict`` as the official ``load_state_dict`` accepts; nothing is ever dropped but
the RoPE tables, which are checked against the geometry instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.image_preprocessing import ImagePreprocessing
from ..models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
from .adapter_keys import adapter_geometry, adapter_plan
from .assemble import assemble_model, skeleton_shapes
from .errors import SourceMismatchError
from .eva_clip_vision import (
    OFFICIAL_COMMIT,
    VISION_PREFIX,
    EvaVisionGeometry,
    check_rope_tables,
    geometry_from_model_config,
    infer_named_model,
    is_rope_table,
    named_geometry,
    uses_separate_qv_bias,
    vision_plan,
)
from .open_clip_import import load_state_file

TEXT_PREFIX = "text.text_adaptor."
CHECKPOINT_WRAPPERS = ("model", "module", "state_dict")


def resolve_geometry(state: Mapping[str, torch.Tensor], model: str | None,
                     model_config: str | Path | None) -> tuple[EvaVisionGeometry, str]:
    """The tower geometry from ``--model NAME``, ``--model-config JSON`` or, with neither, the one named
    config whose sizes the tensors have; returns it and where it came from."""
    if model is not None and model_config is not None:
        raise ValueError("give one of --model and --model-config, not both")
    if model is not None:
        return named_geometry(model), f"--model {model}"
    if model_config is not None:
        path = Path(model_config)
        if not path.is_file():
            raise FileNotFoundError(f"--model-config {str(path)!r} is not a file")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-config {path}: not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError(f"--model-config {path}: expected a JSON object")
        return geometry_from_model_config(config, str(path)), f"--model-config {path}"
    name = infer_named_model(state)
    if name is None:
        raise ValueError("the tensors' sizes match none of the known EVA-CLIP models (EVA02-CLIP-B-16, "
                         "EVA02-CLIP-L-14, EVA02-CLIP-L-14-336) by themselves; heads and MLP ratio are in "
                         "no tensor shape, so name the model with --model or give its official model-config "
                         "JSON with --model-config")
    return named_geometry(name), f"{name} (the only known model with these tensor sizes)"


def convert_eva_clip(source: str | Path, *, model: str | None = None, model_config: str | Path | None = None,
                     input_norm: str = "l2",
                     dtype: torch.dtype | None = None) -> tuple[LLM2CLIPModel, dict[str, Any]]:
    """Convert the EVA-CLIP state-dict file ``source`` (see the module docstring); returns the model and a
    provenance record."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"eva-clip source {str(source)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"eva-clip source {str(source)!r} is a folder; --from eva-clip reads one state-dict "
                         "file (.pt/.pth/.bin/.safetensors)")
    state = load_state_file(path, CHECKPOINT_WRAPPERS)
    if "text.logit_scale" in state and "logit_scale" not in state:
        # an older layout with the scale inside the text tower, which the official load_checkpoint moves too
        state["logit_scale"] = state.pop("text.logit_scale")
    where = f"{path} (as an EVA-CLIP state dict)"
    if not all(any(k.startswith(prefix) for k in state) for prefix in (VISION_PREFIX, TEXT_PREFIX)):
        raise SourceMismatchError(f"{where}: expected visual.* (the EVA02 tower) and text.text_adaptor.* "
                                  f"(the LLM2CLIP adapter) tensors, found e.g. {sorted(state)[:5]}")
    geometry, geometry_from = resolve_geometry(state, model, model_config)
    text = adapter_geometry(state, TEXT_PREFIX)
    config = LLM2CLIPConfig(
        vision={"kind": "timm", "config": geometry.timm_config(),
                "preprocessing": ImagePreprocessing(geometry.image_size).to_dict()},
        embed_dim=geometry.embed_dim,
        text_tower="llm-adapter",
        llm_dim=text.llm_dim,
        adapter={"num_blocks": text.num_blocks, "expansion": text.expansion, "dropout": 0.0,
                 "input_norm": input_norm},
        loss="clip",
        projection_bias=True,
    )
    from .strict_mapping import apply_plan

    plan = vision_plan(geometry, uses_separate_qv_bias(state))
    plan.update(adapter_plan(text, TEXT_PREFIX))
    plan["logit_scale"] = "logit_scale"
    result = apply_plan(state, plan, skeleton_shapes(config), drop=is_rope_table, what=where)
    converted = assemble_model(config, result.tensors)
    # Before any --dtype cast: timm's RoPE buffer would be rounded with the weights, and the source's
    # tables (in its own dtype) would then no longer match tables that are right.
    rope_tables = check_rope_tables(state, converted.vision.model.rope.get_embed(), where)
    if dtype is not None:
        converted.to(dtype)
    provenance = {
        "from": "eva-clip",
        "source": str(path.resolve()),
        "source_files": [path.name],
        "geometry": {"from": geometry_from, "heads": geometry.heads, "mlp_ratio": geometry.mlp_ratio,
                     "pt_hw_seq_len": geometry.pt_hw_seq_len, "timm": geometry.timm_config()},
        "dropped": result.dropped,
        "rope_tables_checked": len(rope_tables),
        "adapter_input_norm": input_norm,
        "official_code": f"microsoft/LLM2CLIP llm2clip/eva_clip (eva_vit_model.py, rope.py, model.py) at "
                         f"{OFFICIAL_COMMIT}",
    }
    return converted, provenance
