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

A plain EVA-CLIP file (no ``text.text_adaptor.*``: the checkpoint the official ``run.sh`` starts stage 2
from, ``--pretrained=eva_clip`` = EVA02_CLIP_L_336_psz14_s6B: ``visual.*`` plus a CLIP text tower and
``logit_scale``) converts as the official ``load_checkpoint`` loads it (``factory.py``): every key
containing ``text`` and every ``visual.head`` key is dropped, the logit scale is kept (unless
``logit_scale_init="new"``), and the parts it lacks are new: a ``TextProj`` adapter for ``llm_dim``-sized
embeddings (PyTorch's default Linear/LayerNorm initialisation, as the official ``TextProj`` gets, seeded)
and the head Linear(width -> embed_dim) initialised as ``EVAVisionTransformer.__init__`` does
(:func:`init_official_head`: truncated normal std 0.02 scaled by ``init_scale`` 1e-3, zero bias).
``embed_dim`` defaults to the model config's (1280 for the LLM2CLIP configs); ``keep_projection`` keeps
the file's own CLIP head instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
# EVAVisionTransformer.__init__'s init_scale default, which _build_vision_tower does not override.
OFFICIAL_HEAD_INIT_SCALE = 0.001


def init_official_head(head: nn.Linear, init_scale: float = OFFICIAL_HEAD_INIT_SCALE) -> None:
    """Initialise ``head`` in place as the official ``EVAVisionTransformer.__init__`` initialises its
    ``head`` (microsoft/LLM2CLIP ``eva_vit_model.py`` at OFFICIAL_COMMIT): ``_init_weights`` first (truncated
    normal std 0.02 within absolute bounds +-2, zero bias), then again truncated normal std 0.02, and
    weight and bias multiplied by ``init_scale``. Both draws are kept, so that from the same RNG state the
    weights are the official ones bit for bit."""
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        nn.init.trunc_normal_(head.weight, std=0.02)
        head.weight.mul_(init_scale)
        if head.bias is not None:
            head.bias.mul_(init_scale)


def is_plain_eva_clip(state: Mapping[str, torch.Tensor]) -> bool:
    """A state dict with an EVA tower but no LLM2CLIP adapter: a pretrained EVA-CLIP to start stage 2 from."""
    return (any(k.startswith(VISION_PREFIX) for k in state)
            and not any(k.startswith(TEXT_PREFIX) for k in state))


def resolve_geometry(state: Mapping[str, torch.Tensor], model: str | None, model_config: str | Path | None,
                     check_head: bool = True) -> tuple[EvaVisionGeometry, str]:
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
    name = infer_named_model(state, check_head=check_head)
    if name is None:
        raise ValueError("the tensors' sizes match none of the known EVA-CLIP models (EVA02-CLIP-B-16, "
                         "EVA02-CLIP-L-14, EVA02-CLIP-L-14-336) by themselves; heads and MLP ratio are in "
                         "no tensor shape, so name the model with --model or give its official model-config "
                         "JSON with --model-config")
    return named_geometry(name), f"{name} (the only known model with these tensor sizes)"


def convert_eva_clip(source: str | Path, *, model: str | None = None, model_config: str | Path | None = None,
                     input_norm: str = "l2", dtype: torch.dtype | None = None,
                     new_parts: dict[str, Any] | None = None) -> tuple[LLM2CLIPModel, dict[str, Any]]:
    """Convert the EVA-CLIP state-dict file ``source`` (see the module docstring); returns the model and a
    provenance record. ``new_parts`` (a plain EVA-CLIP file only; then ``llm_dim`` is required):
    ``llm_dim``, ``embed_dim``, ``keep_projection``, ``adapter_blocks``, ``adapter_expansion``, ``seed``,
    ``logit_scale_init`` of the parts the file lacks."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"eva-clip source {str(source)!r} does not exist")
    from .deepspeed_checkpoint import is_deepspeed_checkpoint, load_deepspeed_model_states, model_states_file

    deepspeed: dict[str, Any] | None = None
    if is_deepspeed_checkpoint(path):
        # the official training's own checkpoints (epoch_N/mp_rank_00_model_states.pt): weights under
        # "module", DeepSpeed's objects beside them read as inert stand-ins (no pickled code runs)
        full = load_deepspeed_model_states(path)
        path = model_states_file(path)
        state = {k: v for k, v in full["module"].items() if isinstance(v, torch.Tensor)}
        deepspeed = {k: full.get(k) for k in ("epoch", "global_steps", "global_samples", "ds_version")
                     if isinstance(full.get(k), (int, str))}
    elif path.is_dir():
        raise ValueError(f"eva-clip source {str(source)!r} is a folder; --from eva-clip reads one state-dict "
                         "file (.pt/.pth/.bin/.safetensors) or a DeepSpeed checkpoint (epoch_N/"
                         "mp_rank_00_model_states.pt)")
    else:
        state = load_state_file(path, CHECKPOINT_WRAPPERS)
    if "text.logit_scale" in state and "logit_scale" not in state:
        # an older layout with the scale inside the text tower, which the official load_checkpoint moves too
        state["logit_scale"] = state.pop("text.logit_scale")
    where = f"{path} (as an EVA-CLIP state dict)"
    if is_plain_eva_clip(state):
        converted, provenance = _convert_plain(path, state, model, model_config, input_norm, dtype,
                                               dict(new_parts or {}))
        if deepspeed is not None:
            provenance["deepspeed"] = deepspeed
        return converted, provenance
    if new_parts:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(new_parts))} only apply to "
                         f"--from hf-clip / open_clip and to a plain EVA-CLIP file: {path} is an LLM2CLIP "
                         "state dict (it holds text.text_adaptor.*), which brings its own adapter, head, "
                         "sizes and trained logit scale")
    if not all(any(k.startswith(prefix) for k in state) for prefix in (VISION_PREFIX, TEXT_PREFIX)):
        raise SourceMismatchError(f"{where}: expected visual.* (the EVA02 tower) and text.text_adaptor.* "
                                  f"(the LLM2CLIP adapter) tensors, found e.g. {sorted(state)[:5]}")
    geometry, geometry_from = resolve_geometry(state, model, model_config)
    text = adapter_geometry(state, TEXT_PREFIX)
    config = _model_config(geometry, geometry.embed_dim, text.llm_dim, text.num_blocks, text.expansion,
                           input_norm)
    from .strict_mapping import apply_plan

    plan = vision_plan(geometry, uses_separate_qv_bias(state))
    plan.update(adapter_plan(text, TEXT_PREFIX))
    plan["logit_scale"] = "logit_scale"
    result = apply_plan(state, plan, skeleton_shapes(config), drop=is_rope_table, what=where)
    converted = assemble_model(config, result.tensors)
    rope_tables = _check_rope_then_cast(converted, state, where, dtype)
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
    if deepspeed is not None:
        provenance["deepspeed"] = deepspeed
    return converted, provenance


def _model_config(geometry: EvaVisionGeometry, embed_dim: int, llm_dim: int, num_blocks: int, expansion: int,
                  input_norm: str) -> LLM2CLIPConfig:
    """The LLM2CLIP model an EVA02 tower of ``geometry`` becomes: the timm tower with its preprocessing, a
    biased projection to ``embed_dim``, the official adapter from ``llm_dim`` and the CLIP loss."""
    return LLM2CLIPConfig(
        vision={"kind": "timm", "config": geometry.timm_config(),
                "preprocessing": ImagePreprocessing(geometry.image_size).to_dict()},
        embed_dim=embed_dim, text_tower="llm-adapter", llm_dim=llm_dim,
        adapter={"num_blocks": num_blocks, "expansion": expansion, "dropout": 0.0, "input_norm": input_norm},
        loss="clip", projection_bias=True)


def _check_rope_then_cast(converted: LLM2CLIPModel, state: dict[str, torch.Tensor], where: str,
                          dtype: torch.dtype | None) -> list[str]:
    """The source's RoPE tables checked against the built tower's, then the ``--dtype`` cast. In that
    order: cast first, timm's RoPE buffer would be rounded with the weights, and the source's tables (in
    its own dtype) would then no longer match tables that are right."""
    rope_tables = check_rope_tables(state, converted.vision.model.rope.get_embed(), where)
    if dtype is not None:
        converted.to(dtype)
    return rope_tables


def _convert_plain(path: Path, state: dict[str, torch.Tensor], model: str | None,
                   model_config: str | Path | None, input_norm: str, dtype: torch.dtype | None,
                   new: dict[str, Any]) -> tuple[LLM2CLIPModel, dict[str, Any]]:
    """A plain EVA-CLIP file (see the module docstring)."""
    from .assemble import check_new_head_sizes
    from .pretrained_logit_scale import describe, find_pretrained_logit_params
    from .strict_mapping import apply_plan

    where = f"{path} (as a plain EVA-CLIP state dict)"
    unknown_opts = sorted(set(new) - {"llm_dim", "embed_dim", "keep_projection", "adapter_blocks",
                                      "adapter_expansion", "seed", "logit_scale_init", "loss"})
    if unknown_opts:
        raise TypeError(f"convert_eva_clip: unknown new_parts {unknown_opts}")
    if new.get("loss", "clip") != "clip":
        raise ValueError("--loss: an EVA-CLIP tower starts the CLIP loss (the official recipe's); got "
                         f"{new['loss']!r}")
    llm_dim = new.get("llm_dim")
    if llm_dim is None:
        raise ValueError(f"{path} is a plain EVA-CLIP file (no text.text_adaptor.*: a pretrained EVA-CLIP, "
                         "as the official run.sh starts stage 2 from); give --llm-dim (the size of the LLM "
                         "embeddings the new adapter reads, 4096 for Llama-3-8B)")
    keep_projection = bool(new.get("keep_projection"))
    head = state.get(VISION_PREFIX + "head.weight")
    geometry, geometry_from = resolve_geometry(state, model, model_config, check_head=False)
    embed_dim = new.get("embed_dim")
    if keep_projection:
        if head is None or head.dim() != 2:
            raise SourceMismatchError(f"--keep-projection: {where} has no visual.head.weight to keep")
        if embed_dim is not None and embed_dim != head.shape[0]:
            raise ValueError(f"--keep-projection: the file's head outputs {head.shape[0]} features but "
                             f"--embed-dim is {embed_dim}")
        embed_dim = int(head.shape[0])
    elif embed_dim is None:
        embed_dim = geometry.embed_dim
    check_new_head_sizes(llm_dim, embed_dim, keep_projection)
    config = _model_config(geometry, embed_dim, llm_dim, new.get("adapter_blocks", 4),
                           new.get("adapter_expansion", 2), input_norm)
    plan = vision_plan(geometry, uses_separate_qv_bias(state))
    fresh = [k for k in skeleton_shapes(config) if not k.startswith("vision.")]
    if keep_projection:
        fresh = [k for k in fresh if not k.startswith("visual_projection.")]
    else:
        del plan[VISION_PREFIX + "head.weight"], plan[VISION_PREFIX + "head.bias"]
    logit = find_pretrained_logit_params(state, "clip", new.get("logit_scale_init", "pretrained"), str(path))
    for theirs, ours in logit.plan().items():
        state[theirs] = state[theirs].reshape(())
        plan[theirs] = ours
        fresh.remove(ours)

    def drop(key: str) -> bool:
        # load_checkpoint: every key containing 'text', every 'visual.head' key; the RoPE tables (checked)
        return "text" in key or "visual.head" in key or is_rope_table(key)

    result = apply_plan(state, plan, skeleton_shapes(config), drop=drop, fresh=fresh, what=where)
    seed = int(new.get("seed", 0))
    converted = assemble_model(config, result.tensors, seed=seed)
    if not keep_projection:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_official_head(converted.visual_projection)
    rope_tables = _check_rope_then_cast(converted, state, where, dtype)
    provenance = {
        "from": "eva-clip",
        "kind": "plain EVA-CLIP (pretrained tower; new adapter and head)",
        "source": str(path.resolve()),
        "source_files": [path.name],
        "geometry": {"from": geometry_from, "heads": geometry.heads, "mlp_ratio": geometry.mlp_ratio,
                     "pt_hw_seq_len": geometry.pt_hw_seq_len, "timm": geometry.timm_config()},
        "dropped": result.dropped,
        "fresh": sorted(fresh),
        "seed": seed,
        "kept_projection": keep_projection,
        "head_init": None if keep_projection else (
            f"official EVAVisionTransformer head init: trunc_normal std 0.02 x {OFFICIAL_HEAD_INIT_SCALE}, "
            "zero bias"),
        "rope_tables_checked": len(rope_tables),
        "adapter_input_norm": input_norm,
        "logit_scale": describe(logit, state, str(path)),
        "official_code": f"microsoft/LLM2CLIP llm2clip/eva_clip (factory.py load_checkpoint, "
                         f"eva_vit_model.py, model.py TextProj) at {OFFICIAL_COMMIT}",
    }
    return converted, provenance
