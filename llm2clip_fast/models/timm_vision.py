"""timm image encoders as vision towers (kind ``"timm"`` of
:class:`~llm2clip_fast.models.vision.VisionTower`).

A timm tower is described by ``{"model_name": NAME, "model_args": {...}}`` and built with
``timm.create_model(NAME, pretrained=False, num_classes=0, **model_args)``: timm never downloads here,
weights come from our own checkpoints or a conversion (EVA02-CLIP: :mod:`llm2clip_fast.convert.eva_clip`).
The pooled feature is timm's pre-logits output (``forward_head(forward_features(x), pre_logits=True)``:
the model's own pooling and final norm, no classifier).

Towers must be ViT-style: a ``blocks`` sequence of transformer layers, which gives the layer ids for
layer-wise lr decay (stem 0, ``blocks.N`` N + 1, the rest ``len(blocks) + 1``), the layers to freeze
and the modules FSDP wraps. The stem is what timm registers before ``blocks`` (patch embedding, class
and register tokens, position embedding, pre-norm).

timm is an optional dependency (``pip install "llm2clip_fast[timm]"``), imported only when a timm tower
is built. It imports torchvision, whose build must match torch's (:func:`import_timm` says so when it
does not).
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..missing_dependency import MissingDependencyError
from .image_preprocessing import ImagePreprocessing

TIMM_INSTALL = 'pip install "llm2clip_fast[timm]"'
CONFIG_FIELDS = ("model_name", "model_args")
# create_model arguments this module sets itself (no download, no classifier) or that load weights.
_RESERVED_ARGS = ("pretrained", "num_classes", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                  "cache_dir")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
CONFIG_ATTR = "llm2clip_timm_config"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _torchvision_failed(exc: BaseException) -> bool:
    """Whether an exception raised while importing timm came from torchvision."""
    if "torchvision" in str(exc) or getattr(exc, "name", "") in ("torchvision",):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if "torchvision" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def import_timm() -> ModuleType:
    """``timm``, or a :class:`MissingDependencyError` saying what to install or fix."""
    try:
        import timm
    except ModuleNotFoundError as exc:
        if exc.name == "timm":
            raise MissingDependencyError(f"timm vision towers need timm, which is not installed here; "
                                         f"install it with: {TIMM_INSTALL}") from None
        if not _torchvision_failed(exc):
            raise
        raise MissingDependencyError(f"timm {_version('timm')} imports torchvision, which is not installed "
                                     f"here; install the torchvision release built for torch "
                                     f"{torch.__version__}") from exc
    except Exception as exc:
        if not _torchvision_failed(exc):
            raise
        raise MissingDependencyError(
            f"timm could not be imported because torchvision {_version('torchvision')} does not work with "
            f"torch {torch.__version__} ({type(exc).__name__}: {exc}). torch and torchvision must be "
            "builds of the same release pair for the same device: a CUDA torchvision beside a CPU torch "
            "(or the other way round) fails like this. Install the matching torchvision from the index "
            "torch came from (CPU torch: pip install torchvision --index-url "
            "https://download.pytorch.org/whl/cpu), or a CUDA torch next to a CUDA torchvision") from exc
    return timm


def check_config(config: Any) -> dict[str, Any]:
    """``{"model_name": str, "model_args": dict}`` (a copy), or a ValueError naming what is wrong."""
    if not isinstance(config, dict):
        raise TypeError(f"a timm tower config must be a dict {{'model_name', 'model_args'}}, got "
                        f"{type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"timm tower config: unknown fields {unknown}; expected {list(CONFIG_FIELDS)}")
    name = config.get("model_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"timm tower config: model_name must be a timm model name, got {name!r}")
    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"timm tower config: model_args must be a dict, got {type(args).__name__}")
    reserved = sorted(set(args) & set(_RESERVED_ARGS))
    if reserved:
        raise ValueError(f"timm tower config: model_args may not set {reserved} (towers are built without a "
                         "classifier and never download weights)")
    return {"model_name": name, "model_args": copy.deepcopy(args)}


def create_timm_model(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised timm model without classifier; the config is kept on it (``CONFIG_ATTR``)."""
    config = check_config(config)
    timm = import_timm()
    name = config["model_name"]
    if not timm.is_model(name):
        raise ValueError(f"timm {timm.__version__} has no model {name!r} (timm.list_models() lists them)")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **config["model_args"])
    except TypeError as exc:
        raise ValueError(f"timm model {name!r} does not take model_args {config['model_args']}: "
                         f"{exc}") from None
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"timm model {name!r} ({type(model).__name__}) has no 'blocks' sequence of "
                         "transformer layers; timm towers must be ViT-style (ViT, EVA, DeiT, BEiT, ...)")
    setattr(model, CONFIG_ATTR, config)
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """The ``{"model_name", "model_args"}`` a model was built from by :func:`create_timm_model`."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise TypeError("a timm tower's model must come from create_timm_model (VisionTower.from_timm), "
                        "which records the config that rebuilds it")
    return copy.deepcopy(config)


def hidden_size(model: nn.Module) -> int:
    """Size of the pre-logits feature."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def image_size(model: nn.Module) -> int:
    """The square input side the model is built for (its patch embedding's, else its data config's)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    size = tuple(int(s) for s in (size if isinstance(size, (tuple, list)) else (size, size)))
    if size[0] != size[1]:
        raise ValueError(f"timm tower takes {size[0]}x{size[1]} images; only square inputs are supported")
    return size[0]


def num_layers(model: nn.Module) -> int:
    return len(model.blocks)


def stem_names(model: nn.Module) -> frozenset[str]:
    """Parameters that timm registers before the first block (tokens, position and patch embeddings)."""
    stem = []
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            break
        stem.append(name)
    return frozenset(stem)


def layer_id(name: str, stem: frozenset[str], layers: int) -> int:
    """0 for the stem, N + 1 for ``blocks.N.*``, ``layers + 1`` for everything after the blocks."""
    m = _BLOCK_RE.match(name)
    if m:
        return int(m.group(1)) + 1
    return 0 if name in stem else layers + 1


def no_weight_decay(model: nn.Module) -> frozenset[str]:
    """The parameter names timm's ``model.no_weight_decay()`` lists (a model without it: none)."""
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    params = dict(model.named_parameters())
    return frozenset(n for n in names if n in params)


def pooled(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) -> (B, hidden_size): timm's pre-logits features."""
    return model.forward_head(model.forward_features(pixel_values), pre_logits=True)


def data_preprocessing(model: nn.Module, size: int) -> ImagePreprocessing:
    """The eval transform of timm's data config for ``model`` (its pretrained config's mean/std,
    interpolation, crop_pct and crop_mode) at the tower's ``size``."""
    timm = import_timm()
    data_config = timm.data.resolve_data_config({"input_size": (3, size, size)}, model=model)
    return ImagePreprocessing.from_timm(data_config)



# Wrappers a training checkpoint may hold the weights under (timm's own checkpoint_filter_fns unwrap the
# same ones), the first found wins.
_CHECKPOINT_WRAPPERS = ("model_ema", "model", "module", "state_dict")


def load_checkpoint_file(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Load the local weights file ``path`` into the timm tower ``model`` (built by
    :func:`create_timm_model`, so without classifier) and return every tensor the file holds (unwrapped),
    for the caller to read what is not the tower's (a CLIP checkpoint's ``logit_scale``).

    ``path``: ``.safetensors``, or a ``.pt``/``.pth``/``.bin`` pickle read with ``torch.load(weights_only
    =True)`` (no code from it runs). The tensors go through the model family's own
    ``checkpoint_filter_fn`` (as ``timm.create_model(pretrained=True)`` would apply it: EVA-CLIP and
    OpenCLIP layouts with a ``visual.`` prefix, patch-embedding and position-embedding resampling), the
    classifier's keys are left out (towers have none), and the rest must match the tower exactly:
    ValueError listing the missing and unexpected keys otherwise.
    """
    import sys
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--vision-timm-checkpoint {str(path)!r} is not a file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(file))
    elif file.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling error names what the file tried to build
            raise ValueError(f"--vision-timm-checkpoint {file}: not a plain state dict of tensors "
                             f"({type(exc).__name__}: {exc})") from None
    else:
        raise ValueError(f"--vision-timm-checkpoint {file}: expected a .safetensors, .pt, .pth or .bin file")
    for wrapper in _CHECKPOINT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state:
        raise ValueError(f"--vision-timm-checkpoint {file} holds no state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    filtered = filter_fn(dict(tensors), model) if filter_fn is not None else dict(tensors)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = dict(model.state_dict())
    filtered = {k: v for k, v in filtered.items()
                if k in own or not any(k == c or k.startswith(c + ".") for c in classifiers)}
    result = model.load_state_dict(filtered, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("rope.pos_embed", "freqs_cos", "freqs_sin"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"--vision-timm-checkpoint {file} does not fit timm model "
                         f"{model_config(model)['model_name']!r}: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
                         f"{' ...' if len(result.unexpected_keys) > 8 else ''}")
    return tensors
