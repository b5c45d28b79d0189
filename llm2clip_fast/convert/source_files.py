"""Reading a source checkpoint: its ``config.json`` and its tensors, never its code.

A Hugging Face folder holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
Pickled weights (``pytorch_model.bin``) are refused: loading them can run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import SourceMismatchError

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"


def require_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder: a local one, or a hub name (``owner/name``) already in the local Hugging Face
    cache (never downloaded); FileNotFoundError / NotADirectoryError naming ``what`` otherwise."""
    local = Path(path).expanduser()
    if local.exists() and not local.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is not a folder")
    if local.is_dir():
        return local
    from ..models.llm_encoder import resolve_model_path

    try:
        return resolve_model_path(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{what}: {exc}") from None


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json (expected a Hugging Face model folder)")
    return read_json_object(config_file)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; SourceMismatchError when the file is not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceMismatchError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SourceMismatchError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors_folder(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of the folder's safetensors weights (single file or shards) and the files read; a
    damaged file raises :class:`~llm2clip_fast.safetensors_files.DamagedWeightsError` naming it."""
    from ..safetensors_files import read_safetensors as load_file

    single, index = folder / SAFETENSORS_NAME, folder / SAFETENSORS_INDEX_NAME
    if single.is_file():
        return load_file(str(single)), [single.name]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SourceMismatchError(f"{index} is not a safetensors index (no 'weight_map'): "
                                      f"{exc}") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {str(folder)!r}: {missing}")
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            for key, value in load_file(str(folder / shard)).items():
                if weight_map.get(key) != shard:
                    raise SourceMismatchError(f"tensor {key!r} in shard {shard} is not listed there by "
                                              f"{index.name}")
                tensors[key] = value
        unlisted = sorted(set(weight_map) - set(tensors))
        if unlisted:
            raise SourceMismatchError(f"{index.name} lists tensors no shard holds: {unlisted[:10]}")
        return tensors, shards
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f"; it holds pickled weights {pickled}, which are not read because loading them can run code "
            "(re-save them as safetensors)") if pickled else ""
    raise FileNotFoundError(f"{str(folder)!r} has neither {SAFETENSORS_NAME} nor "
                            f"{SAFETENSORS_INDEX_NAME}{hint}")


def read_safetensors_tensor(folder: Path, key: str) -> torch.Tensor | None:
    """One tensor of the folder's safetensors weights (single file or shards), None when it has no such
    tensor; only that tensor is read."""
    from ..safetensors_files import open_safetensors

    single, index = folder / SAFETENSORS_NAME, folder / SAFETENSORS_INDEX_NAME
    if single.is_file():
        path = single
    elif index.is_file():
        try:
            shard = json.loads(index.read_text(encoding="utf-8"))["weight_map"].get(key)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SourceMismatchError(f"{index} is not a safetensors index (no 'weight_map'): "
                                      f"{exc}") from None
        if shard is None:
            return None
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index} lists shard {shard} for {key!r}, which is not in "
                                    f"{str(folder)!r}")
    else:
        raise FileNotFoundError(f"{str(folder)!r} has neither {SAFETENSORS_NAME} nor "
                                f"{SAFETENSORS_INDEX_NAME}")
    with open_safetensors(path) as f:
        return f.get_tensor(key) if key in f.keys() else None


def tower_preprocessing(folder: Path, vision_config: dict[str, Any]) -> dict[str, Any]:
    """The CLIP tower's image preprocessing: the folder's ``preprocessor_config.json`` where there is
    one (as transformers' image processor reads it), else CLIP's defaults at the tower's image size."""
    from ..models.image_preprocessing import ImagePreprocessing

    size = vision_config.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return ImagePreprocessing.from_hf_folder(folder, "clip", size).to_dict()
