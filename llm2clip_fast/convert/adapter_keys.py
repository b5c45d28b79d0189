"""The official text adapter's key layout, mapped onto our
:class:`~llm2clip_fast.models.text_adapter.TextAdapter`.

Matched against microsoft/LLM2CLIP ``llm2clip/eva_clip/model.py`` at commit
cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a (classes ``LinearBlock`` and ``TextProj``)::

    TextProj.text_adaptor = nn.Sequential(
        *[LinearBlock(d, expansion_factor, dropout) for _ in range(num_layers_text)],  # 0 .. n-1
        nn.LayerNorm(d),                                                             # n
        nn.Linear(d, output_dim, bias=proj_bias),                                    # n + 1
    )
    LinearBlock.fn = nn.Sequential(Linear(d, e*d), GELU(), Dropout, Linear(e*d, d))  # fn.0, fn.3
    LinearBlock.ln = LayerNorm(d)            # the eva_clip LayerNorm subclass, eps 1e-5
    LinearBlock.forward(x) = x + fn(ln(x))
    TextProj.forward(text, l2_norm=True) = text_adaptor(normalize(text) if l2_norm else text)

which is our adapter's layout (``blocks.i.norm/fc1/fc2``, ``final_norm``, ``proj``) with exact GELU,
LayerNorm eps 1e-5 and biases everywhere; only the input normalisation is a choice (``input_norm``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import SourceMismatchError


@dataclass(frozen=True)
class AdapterGeometry:
    """Sizes read off the official adapter's tensors."""

    llm_dim: int
    embed_dim: int
    num_blocks: int
    expansion: int


def _index_re(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"(\d+)\.")


def adapter_geometry(source: Mapping[str, torch.Tensor], prefix: str) -> AdapterGeometry:
    """Block count and sizes of the official ``nn.Sequential`` adapter stored under ``prefix``
    (e.g. ``"text_adapter.adaptor."``). Raises SourceMismatchError when the layout is not the official one."""
    pattern = _index_re(prefix)
    indices: dict[int, set[str]] = {}
    for key in source:
        m = pattern.match(key)
        if m:
            indices.setdefault(int(m.group(1)), set()).add(key[m.end():])
    if not indices:
        raise SourceMismatchError(f"no text adapter tensors under {prefix!r} "
                                  f"(expected {prefix}0.fn.0.weight, ...)")
    blocks = sorted(i for i, rest in indices.items() if any(r.startswith(("fn.", "ln.")) for r in rest))
    heads = sorted(set(indices) - set(blocks))
    n = len(blocks)
    if blocks != list(range(n)) or heads != [n, n + 1]:
        raise SourceMismatchError(
            f"the adapter under {prefix!r} is not the official layout: residual blocks at {blocks} "
            f"(expected 0..n-1) and head modules at {heads} (expected [n, n+1] = LayerNorm, Linear)")
    needed = [f"{prefix}{n}.weight", f"{prefix}{n + 1}.weight"] + ([f"{prefix}0.fn.0.weight"] if n else [])
    absent = [k for k in needed if k not in source]
    if absent:
        raise SourceMismatchError(f"the adapter under {prefix!r} lacks {absent}")
    llm_dim = int(source[f"{prefix}{n}.weight"].shape[0])
    embed_dim = int(source[f"{prefix}{n + 1}.weight"].shape[0])
    expansion = 2
    if n:
        hidden = int(source[f"{prefix}0.fn.0.weight"].shape[0])
        if hidden % llm_dim:
            raise SourceMismatchError(f"{prefix}0.fn.0.weight has {hidden} rows, not a multiple of the "
                                      f"adapter width {llm_dim}")
        expansion = hidden // llm_dim
    return AdapterGeometry(llm_dim=llm_dim, embed_dim=embed_dim, num_blocks=n, expansion=expansion)


def adapter_plan(geometry: AdapterGeometry, prefix: str,
                 target_prefix: str = "text_adapter.") -> dict[str, str]:
    """``{official key: our key}`` for every tensor of the official adapter."""
    plan: dict[str, str] = {}
    for i in range(geometry.num_blocks):
        for ours, theirs in (("norm", "ln"), ("fc1", "fn.0"), ("fc2", "fn.3")):
            for p in ("weight", "bias"):
                plan[f"{prefix}{i}.{theirs}.{p}"] = f"{target_prefix}blocks.{i}.{ours}.{p}"
    n = geometry.num_blocks
    for index, ours in ((n, "final_norm"), (n + 1, "proj")):
        for p in ("weight", "bias"):
            plan[f"{prefix}{index}.{p}"] = f"{target_prefix}{ours}.{p}"
    return plan
