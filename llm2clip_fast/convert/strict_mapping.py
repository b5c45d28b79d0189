"""Strict renaming of a source state dict onto a target model's parameter names.

A conversion is a plan ``{source key: target key}`` plus the source keys it deliberately drops (e.g. a
CLIP text tower). Applying it checks everything at once and raises one
:class:`~llm2clip_fast.convert.errors.SourceMismatchError` that lists every problem: source keys the plan
neither maps nor drops, planned keys the source lacks, tensors whose shape differs from the target's,
and target entries nothing fills. Tensors keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import SourceMismatchError

_SHOWN = 20


@dataclass
class MappingResult:
    """``tensors``: target name -> tensor (source dtype); ``dropped``: source keys deliberately left out."""

    tensors: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)


def _listed(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f" ... (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{title} ({len(items)}): {shown}{more}"


def apply_plan(source: Mapping[str, torch.Tensor], plan: Mapping[str, str],
               target_shapes: Mapping[str, torch.Size | tuple[int, ...]],
               drop: Callable[[str], bool] = lambda key: False,
               fresh: Iterable[str] = (), what: str = "source") -> MappingResult:
    """Rename ``source`` by ``plan`` onto ``target_shapes`` (the target model's state-dict shapes).

    ``drop(key)`` says which unplanned source keys are deliberately left out; ``fresh`` names target
    entries that the conversion initialises itself (not filled from the source). Raises
    SourceMismatchError listing unknown, missing, shape-mismatched and unfilled keys.
    """
    problems: list[str] = []
    unknown = sorted(k for k in source if k not in plan and not drop(k))
    missing = sorted(k for k in plan if k not in source)
    targets = list(plan.values())
    if len(set(targets)) != len(targets):
        raise AssertionError("conversion plan maps two source keys onto one target")
    not_in_target = sorted(t for t in targets if t not in target_shapes)
    fresh = set(fresh)
    unfilled = sorted(t for t in target_shapes if t not in set(targets) and t not in fresh)
    mismatched = []
    for src, dst in plan.items():
        if src in source and dst in target_shapes and tuple(source[src].shape) != tuple(target_shapes[dst]):
            mismatched.append(f"{src} {tuple(source[src].shape)} -> {dst} "
                              f"expects {tuple(target_shapes[dst])}")
    if unknown:
        problems.append(_listed("unknown keys", unknown))
    if missing:
        problems.append(_listed("missing keys", missing))
    if mismatched:
        problems.append(_listed("shape mismatches", mismatched))
    if not_in_target:
        problems.append(_listed("keys the target model does not have", not_in_target))
    if unfilled:
        problems.append(_listed("target entries nothing fills", unfilled))
    if problems:
        raise SourceMismatchError(f"{what} does not match: " + "; ".join(problems))
    return MappingResult(tensors={dst: source[src] for src, dst in plan.items()},
                         dropped=sorted(k for k in source if k not in plan))
