"""``--from open_clip``: a pretrained OpenCLIP CLIP whose ViT image tower (and optionally its projection)
starts stage 2, as a transformers ``CLIPVisionModel`` inside our ``VisionTower`` (kind "clip").

The source is

- a folder as OpenCLIP's hub folders are (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg``, plus ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), a local
  one or a hub name already in the local Hugging Face cache; the architecture, the activation
  (``model_cfg.quick_gelu``; when absent OpenCLIP's default GELU, unless the folder or hub name says
  ``openai``/``quickgelu``, where ``--act`` must decide) and the image preprocessing come from the
  config, and the tensors must agree with it;
- or a state-dict file (``.safetensors``, or ``.bin``/``.pt``/``.pth``, also an OpenCLIP training
  checkpoint ``{"state_dict": {"module.visual...": ...}}``): the sizes are read off the tensors, while
  the head count (``--heads``) and the activation (``--act``) must be stated, since no shape holds them;
  the preprocessing is OpenAI CLIP's, OpenCLIP's default.

Pickled files are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers and runs no code from the file. The text tower (``token_embedding``, ``transformer.*``,
``ln_final``, ``text_projection``, ``text.*``) is dropped; ``logit_scale`` (and for a SigLIP-loss model
``logit_bias``) is kept, as the official LLM2CLIP run keeps its starting checkpoint's, unless
``logit_scale_init="new"`` (:mod:`.pretrained_logit_scale`); the text adapter is new (seeded), as is the
projection unless ``keep_projection``. Towers
that are not OpenCLIP's plain ViT are refused, naming what was found: ModifiedResNet (``visual.layer1``),
timm trunks (``visual.trunk.*``), attentional pooling, LayerScale, custom attention blocks, average
pooling. Key layout and forward: :mod:`llm2clip_fast.convert.open_clip_keys` (open_clip_torch 3.3.0).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.image_preprocessing import ImagePreprocessing
from ..models.llm2clip import LLM2CLIPModel
from .assemble import assemble_model, check_new_head_sizes, pretrained_tower_config, skeleton_shapes
from .clip_vision_keys import TOWER_PREFIX
from .errors import SourceMismatchError
from .open_clip_keys import (
    ACTIVATIONS,
    CONFIG_NAME,
    DEFAULT_HEAD_WIDTH,
    DEFAULT_LAYER_NORM_EPS,
    PROJ_KEY,
    QKV,
    VISUAL,
    OpenClipVisionGeometry,
    geometry_from_tensors,
    hf_names,
    is_packed,
    packed_names,
)
from .pretrained_logit_scale import describe, find_pretrained_logit_params
from .source_files import read_json_object, require_folder
from .strict_mapping import apply_plan

WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# An OpenCLIP CLIP / CustomTextCLIP stores these besides visual.*; they have no place in stage 2. The
# last three are the integers OpenAI's own checkpoints carry (OpenCLIP's openai.py pops them too).
_TEXT_SIDE_KEYS = ("positional_embedding", "text_projection", "logit_scale", "logit_bias", "attn_mask",
                   "input_resolution", "context_length", "vocab_size")
_TEXT_SIDE_PREFIXES = ("token_embedding.", "transformer.", "ln_final.", "text_projection.", "text.")
# CLIPVisionCfg fields and the values our tower reproduces (OpenCLIP's defaults); any other value is
# refused. A field in none of these tables is unknown to OpenCLIP 3.3.0's CLIPVisionCfg as well.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,), "attentional_pool": (False,), "no_ln_pre": (False,), "pool_type": ("tok",),
    "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
    "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
    # sin_cos_2d: a fixed table, stored like the learnable one (it becomes trainable here)
    "pos_embed_type": ("learnable", "sin_cos_2d"),
}
_SIZE_FIELDS = ("layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size")
# Fields that do not change the eval forward of a 'tok'-pooled ViT: final_ln_after_pool (LayerNorm is
# per token, so before or after taking the class token is the same), patch_dropout (training only),
# output_tokens, the attentional pooler's sizes and the timm options (unused without those towers).
_IGNORED_FIELDS = ("final_ln_after_pool", "patch_dropout", "output_tokens", "attn_pooler_queries",
                   "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                   "timm_drop", "timm_drop_path")
# Checked on their own: a timm tower is refused, act_kwargs must be empty, norm_kwargs may set eps only.
_CHECKED_FIELDS = ("timm_model_name", "act_kwargs", "norm_kwargs")
_DEFAULTS = {"layers": 12, "width": 768, "head_width": DEFAULT_HEAD_WIDTH, "mlp_ratio": 4.0, "patch_size": 16,
             "image_size": 224}


@dataclass
class OpenClipSource:
    """A read source: its tensors (``module.`` and checkpoint wrappers removed), its config (None for a
    bare state dict), the path and the files read."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    path: Path
    files: list[str]


def load_state_file(path: Path, wrappers: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (safetensors, or a pickle read with ``weights_only=True``), unwrapped
    from a training checkpoint (the first of ``wrappers`` it holds, e.g. OpenCLIP's ``state_dict``;
    ``module.`` prefixes)."""
    if path.suffix == ".safetensors":
        from ..safetensors_files import read_safetensors

        state: Any = read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            hint = (" (a TorchScript archive such as OpenAI's original release: take the OpenCLIP hub folder "
                    "of the same weights instead)") if "TorchScript" in str(exc) else ""
            raise SourceMismatchError(f"{path} cannot be read as a state dict of tensors{hint}: "
                                      f"{exc}") from None
    else:
        raise ValueError(f"{path}: expected a .safetensors, .bin, .pt or .pth state dict file")
    wrapper = next((w for w in wrappers if isinstance(state, dict) and isinstance(state.get(w), dict)), None)
    if wrapper is not None:
        state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise SourceMismatchError(f"{path} does not hold a state dict (a non-empty dict of tensors)")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise SourceMismatchError(f"{path}: entries that are not tensors: {not_tensors[:10]}")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_open_clip_source(source: str | Path) -> OpenClipSource:
    """A state-dict file, or an OpenCLIP hub-style folder (local, or a hub name in the local cache)."""
    local = Path(source).expanduser()
    if local.is_file():
        return OpenClipSource(load_state_file(local), None, local, [local.name])
    folder = require_folder(source, "open_clip source")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_NAME}; an OpenCLIP hub folder has one (for "
                                "a bare state dict, pass the file itself with --heads and --act)")
    config = read_json_object(config_file)
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{str(folder)!r} has none of {list(WEIGHT_NAMES)}")
    return OpenClipSource(load_state_file(weights), config, folder, [CONFIG_NAME, weights.name])


def model_and_preprocess_cfg(config: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` of an ``open_clip_config.json`` (or of a bare model config, as
    OpenCLIP's ``model_configs/*.json`` are)."""
    model_cfg = config.get("model_cfg", config)
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise SourceMismatchError(f"{where} has no model_cfg.vision_cfg object")
    preprocess_cfg = config.get("preprocess_cfg") or {}
    if not isinstance(preprocess_cfg, dict):
        raise SourceMismatchError(f"{where}: preprocess_cfg must be an object")
    return model_cfg, preprocess_cfg


def refuse_other_towers(tensors: Mapping[str, torch.Tensor], vision_cfg: dict[str, Any] | None,
                        where: str) -> None:
    """SourceMismatchError naming what was found when the image tower is not OpenCLIP's plain ViT."""
    found = []
    trunk = sorted(k for k in tensors if k.startswith(VISUAL + "trunk."))
    if trunk or (vision_cfg or {}).get("timm_model_name"):
        name = (vision_cfg or {}).get("timm_model_name")
        found.append(f"a timm image tower ({'timm_model_name ' + repr(name) + ', ' if name else ''}"
                     f"{len(trunk)} visual.trunk.* tensors)")
    resnet = sorted(k for k in tensors if k.startswith((VISUAL + "layer1.", VISUAL + "attnpool.")))
    if resnet or isinstance((vision_cfg or {}).get("layers"), (list, tuple)):
        found.append(f"a ModifiedResNet image tower (layers {(vision_cfg or {}).get('layers')}, e.g. "
                     f"{resnet[:2]})")
    if not any(k.startswith(VISUAL) for k in tensors):
        found.append("no visual.* tensors at all")
    if vision_cfg is not None:
        for name, allowed in _REQUIRED_VALUES.items():
            if name in vision_cfg and vision_cfg[name] not in allowed:
                found.append(f"vision_cfg.{name}={vision_cfg[name]!r}")
        if vision_cfg.get("act_kwargs"):
            found.append(f"vision_cfg.act_kwargs={vision_cfg['act_kwargs']!r}")
        norm = vision_cfg.get("norm_kwargs") or {}
        if set(norm) - {"eps"}:
            found.append(f"vision_cfg.norm_kwargs={norm!r}")
        known = {*_REQUIRED_VALUES, *_SIZE_FIELDS, *_IGNORED_FIELDS, *_CHECKED_FIELDS}
        unknown = sorted(set(vision_cfg) - known)
        if unknown:
            found.append(f"vision_cfg fields OpenCLIP's CLIPVisionCfg does not have: {unknown}")
    if found:
        raise SourceMismatchError(f"{where}: not an OpenCLIP ViT image tower that a transformers CLIP vision "
                                  f"model reproduces: {'; '.join(found)}. --from open_clip converts "
                                  "OpenCLIP's own ViT (visual.conv1, visual.transformer.resblocks.*, "
                                  "class-token pooling)")


def _square(value: Any, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise SourceMismatchError(f"{where}: vision_cfg.{name}={value!r}; only square sizes are "
                                      "supported")
        value = value[0]
    return int(value)


def _quick_gelu_hint(name: str) -> bool:
    """Whether a model's name says QuickGELU: OpenAI's weights and OpenCLIP's ``*-quickgelu`` configs."""
    return any(word in name.lower() for word in ("openai", "quickgelu", "quick_gelu"))


def resolve_geometry(tensors: Mapping[str, torch.Tensor], model_cfg: dict[str, Any] | None,
                     act: str | None, heads: int | None, where: str,
                     name: str = "") -> tuple[OpenClipVisionGeometry, str]:
    """The tower's architecture: shapes from the tensors, checked against the config when there is one;
    heads and activation from the config or, for a bare state dict, from ``heads``/``act``. Returns it and
    where the activation came from.

    A config without ``quick_gelu`` means GELU to OpenCLIP; when the model's ``name`` (the folder or hub
    name) says QuickGELU, the two disagree and ``act`` must decide."""
    shape = geometry_from_tensors(tensors)
    width = int(shape["width"])
    if model_cfg is None:
        if heads is None:
            raise ValueError("a bare state dict does not say how many attention heads the tower has (no "
                             "tensor shape holds it): pass --heads (OpenCLIP: width // head_width, "
                             f"head_width {DEFAULT_HEAD_WIDTH} unless the model config says otherwise; this "
                             f"tower's width is {width}), or convert the hub folder with its {CONFIG_NAME}")
        if act is None:
            raise ValueError("a bare state dict does not say which activation the tower was trained with: "
                             "pass --act quick_gelu (OpenAI-pretrained weights and OpenCLIP's *-quickgelu "
                             "models) or --act gelu (other OpenCLIP models), or convert the hub folder with "
                             f"its {CONFIG_NAME}")
        act_from, eps = "--act", DEFAULT_LAYER_NORM_EPS
    else:
        cfg = {**_DEFAULTS, **model_cfg["vision_cfg"]}
        if int(cfg["head_width"]) < 1:
            raise SourceMismatchError(f"{where}: vision_cfg.head_width must be positive, got "
                                      f"{cfg['head_width']}")
        config_heads = int(cfg["width"]) // int(cfg["head_width"])
        if heads is not None and heads != config_heads:
            raise ValueError(f"--heads {heads} contradicts {where} (width {cfg['width']} // head_width "
                             f"{cfg['head_width']} = {config_heads})")
        heads = config_heads
        flag = model_cfg.get("quick_gelu")
        if flag is not None and not isinstance(flag, bool):
            raise SourceMismatchError(f"{where}: model_cfg.quick_gelu must be true or false, got {flag!r}")
        config_act = None if flag is None else ("quick_gelu" if flag else "gelu")
        if act is not None and config_act is not None and act != config_act:
            raise ValueError(f"--act {act} contradicts {where} (model_cfg.quick_gelu={flag})")
        if config_act is not None:
            act, act_from = config_act, "model_cfg.quick_gelu"
        elif act is not None:
            act_from = "--act (model_cfg has no quick_gelu flag)"
        elif _quick_gelu_hint(name):
            raise ValueError(f"{where} has no model_cfg.quick_gelu flag, so OpenCLIP would build GELU, but "
                             f"the name {name!r} says QuickGELU (OpenAI-pretrained or *-quickgelu): state "
                             "the activation with --act quick_gelu or --act gelu")
        else:
            act, act_from = "gelu", "OpenCLIP's default without model_cfg.quick_gelu (GELU)"
        eps = float((cfg.get("norm_kwargs") or {}).get("eps", DEFAULT_LAYER_NORM_EPS))
        expected = {"width": int(cfg["width"]), "layers": int(cfg["layers"]),
                    "patch_size": _square(cfg["patch_size"], "patch_size", where),
                    "image_size": _square(cfg["image_size"], "image_size", where),
                    "mlp_width": int(int(cfg["width"]) * float(cfg["mlp_ratio"]))}
        if shape["embed_dim"] is not None and "embed_dim" in model_cfg:
            expected["embed_dim"] = int(model_cfg["embed_dim"])
        differ = [f"{k} {v} (tensors: {shape[k]})" for k, v in expected.items() if shape[k] != v]
        if differ:
            raise SourceMismatchError(f"{where} does not describe its tensors: {', '.join(differ)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"--act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    bad_heads = SourceMismatchError if model_cfg is not None else ValueError
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise bad_heads(f"{heads} attention heads do not divide the tower's width {width}")
    geometry = OpenClipVisionGeometry(
        width=width, layers=int(shape["layers"]), heads=heads, patch_size=int(shape["patch_size"]),
        image_size=int(shape["image_size"]), mlp_width=int(shape["mlp_width"]), act=act, layer_norm_eps=eps,
        embed_dim=shape["embed_dim"])
    return geometry, act_from


def _model_name(source: str | Path) -> str:
    """The name the user knows the model by: a hub id as given, else the folder's or file's name."""
    text = str(source)
    return text if not Path(text).expanduser().exists() else Path(text).expanduser().resolve().name


def _text_side(key: str) -> bool:
    return key in _TEXT_SIDE_KEYS or key.startswith(_TEXT_SIDE_PREFIXES)


def _source_name(view_key: str) -> str:
    """The source key behind a name of :func:`_source_view`."""
    for suffix in (*(f"[{p}]" for p in QKV), ".T"):
        if view_key.endswith(suffix):
            return view_key[: -len(suffix)]
    return view_key


def _source_view(tensors: Mapping[str, torch.Tensor], keep_projection: bool) -> dict[str, torch.Tensor]:
    """The source's tensors as one-to-one pieces: ``<in_proj key>[q|k|v]`` (row thirds; a wrongly sized
    one then shows as a shape mismatch of its thirds) and ``visual.proj.T`` (kept projection)."""
    view: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if is_packed(key):
            parts = torch.tensor_split(value if value.dim() else value.reshape(1), 3)
            view.update({f"{key}[{p}]": t.clone() for p, t in zip(QKV, parts, strict=True)})
        elif key == PROJ_KEY and keep_projection and value.dim() == 2:
            view[PROJ_KEY + ".T"] = value.T.contiguous()
        else:
            view[key] = value
    return view


def convert_open_clip(source: str | Path, *, llm_dim: int, embed_dim: int | None = None,
                      keep_projection: bool = False, act: str | None = None, heads: int | None = None,
                      num_blocks: int = 4, expansion: int = 2, loss: str = "clip", seed: int = 0,
                      input_norm: str = "l2", dtype: torch.dtype | None = None,
                      logit_scale_init: str = "pretrained") -> tuple[LLM2CLIPModel, dict[str, Any]]:
    """Convert ``source`` (see the module docstring); returns the model and a provenance record.

    ``embed_dim`` may be omitted with ``keep_projection`` (``visual.proj``'s output size is used).
    ``logit_scale_init``: "pretrained" keeps the source's logit scale (see the module docstring), "new"
    starts at the new model's.
    """
    check_new_head_sizes(llm_dim, embed_dim, keep_projection)
    src = read_open_clip_source(source)
    where = str(src.path / CONFIG_NAME) if src.config is not None else str(src.path)
    model_cfg = preprocess_cfg = None
    if src.config is not None:
        model_cfg, preprocess_cfg = model_and_preprocess_cfg(src.config, where)
    refuse_other_towers(src.tensors, None if model_cfg is None else model_cfg["vision_cfg"], where)
    geometry, act_from = resolve_geometry(src.tensors, model_cfg, act, heads, where, _model_name(source))
    if keep_projection:
        proj = src.tensors.get(PROJ_KEY)
        if proj is None or proj.dim() != 2 or proj.shape[0] != geometry.width:
            found = "none" if proj is None else f"shape {tuple(proj.shape)}"
            raise SourceMismatchError(f"--keep-projection: {src.path} has no {PROJ_KEY} of shape (width "
                                      f"{geometry.width}, embed_dim) ({found})")
        if embed_dim is not None and proj.shape[1] != embed_dim:
            raise ValueError(f"--keep-projection: the pretrained projection outputs {proj.shape[1]} features "
                             f"but --embed-dim is {embed_dim}")
        embed_dim = int(proj.shape[1])
    try:
        preprocessing = ImagePreprocessing.from_open_clip(preprocess_cfg, geometry.image_size)
    except ValueError as exc:
        raise SourceMismatchError(f"{where}: {exc}") from None
    model_config = pretrained_tower_config(geometry.hf_config(), preprocessing.to_dict(), embed_dim=embed_dim,
                                           llm_dim=llm_dim, num_blocks=num_blocks, expansion=expansion,
                                           input_norm=input_norm, loss=loss)
    target_shapes = skeleton_shapes(model_config)
    target_of = {k[len(TOWER_PREFIX):].removeprefix("vision_model."): k for k in target_shapes
                 if k.startswith(TOWER_PREFIX)}
    plan = {theirs: target_of[ours] for theirs, ours in hf_names(geometry.layers).items()}
    for theirs, parts in packed_names(geometry.layers).items():
        plan.update({f"{theirs}[{p}]": target_of[ours] for p, ours in zip(QKV, parts, strict=True)})
    fresh = [k for k in target_shapes if not k.startswith("vision.")]
    if keep_projection:
        plan[PROJ_KEY + ".T"] = "visual_projection.weight"
        fresh.remove("visual_projection.weight")
    view = _source_view(src.tensors, keep_projection)
    logit = find_pretrained_logit_params(view, loss, logit_scale_init, str(src.path))
    for theirs, ours in logit.plan().items():
        view[theirs] = view[theirs].reshape(())
        plan[theirs] = ours
        fresh.remove(ours)
    result = apply_plan(view, plan, target_shapes,
                        drop=lambda k: _text_side(k) or k == PROJ_KEY, fresh=fresh,
                        what=f"{src.path} (as an OpenCLIP ViT CLIP)")
    model = assemble_model(model_config, result.tensors, seed=seed, dtype=dtype)
    provenance = {
        "from": "open_clip",
        "source": str(src.path.resolve()),
        "source_files": src.files,
        "kept_projection": keep_projection,
        "fresh": sorted(fresh),
        "seed": seed,
        "dropped": sorted({_source_name(k) for k in result.dropped}),
        "activation": {"act": geometry.act, "from": act_from},
        "heads": {"heads": geometry.heads, "from": "--heads" if model_cfg is None else "vision_cfg"},
        "preprocessing_from": "preprocess_cfg" if preprocess_cfg else "OpenCLIP's default (OpenAI CLIP)",
        "open_clip_code": "open_clip_torch 3.3.0 open_clip/transformer.py (VisionTransformer)",
        "logit_scale": describe(logit, view, str(src.path)),
    }
    return model, provenance
