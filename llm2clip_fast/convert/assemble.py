"""Build an :class:`LLM2CLIPModel` from a config and converted tensors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from ..models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def common_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most of ``tensors`` have (float32 when none is floating)."""
    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def assemble_model(config: LLM2CLIPConfig, converted: Mapping[str, torch.Tensor], *, seed: int = 0,
                   dtype: torch.dtype | None = None) -> LLM2CLIPModel:
    """An LLM2CLIPModel (eval mode) whose entries named in ``converted`` are those tensors, dtype kept,
    and whose other entries are freshly initialised (seeded by ``seed``, without touching the caller's
    RNG) in the converted tensors' dtype. ``dtype`` casts every floating entry afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLM2CLIPModel(config)
    fresh_dtype = common_float_dtype(converted)
    state = {k: (v.to(fresh_dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()
             if k not in converted}
    state.update(converted)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def check_new_head_sizes(llm_dim: Any, embed_dim: Any, keep_projection: bool) -> None:
    """The sizes of the parts a tower-only import creates: ``llm_dim`` (the adapter's input) always,
    ``embed_dim`` unless ``keep_projection`` takes it from the pretrained projection."""
    _check_positive("llm_dim", llm_dim)
    if embed_dim is None and not keep_projection:
        raise ValueError("--embed-dim is needed unless --keep-projection takes the size of the pretrained "
                         "projection")
    if embed_dim is not None:
        _check_positive("embed_dim", embed_dim)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def pretrained_tower_config(vision: dict, preprocessing: dict, *, embed_dim: int, llm_dim: int,
                            num_blocks: int, expansion: int, input_norm: str, loss: str) -> LLM2CLIPConfig:
    """An LLM-adapter LLM2CLIPConfig around a converted CLIP tower (``vision``: its transformers config
    fields) with its image ``preprocessing`` and a new adapter of the given geometry."""
    return LLM2CLIPConfig(
        vision={"kind": "clip", "config": dict(vision), "preprocessing": preprocessing},
        embed_dim=embed_dim,
        text_tower="llm-adapter",
        llm_dim=llm_dim,
        adapter={"num_blocks": num_blocks, "expansion": expansion, "dropout": 0.0, "input_norm": input_norm},
        loss=loss,
    )


def skeleton_shapes(config: LLM2CLIPConfig) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model ``config`` describes, built on the meta device (no memory, no RNG)."""
    with torch.device("meta"):
        skeleton = LLM2CLIPModel(LLM2CLIPConfig.from_dict(config.to_dict()))
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
