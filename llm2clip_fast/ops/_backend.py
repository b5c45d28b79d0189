"""Backend registry and dispatch.

Each op keeps an ordered list of :class:`Backend` objects (GPU first: triton, cuda; then the C++ CPU
extension; then torch). A backend answers ``not_supported_reasons(ctx)`` with a list of strings; the
first backend with no reasons runs. ``ctx`` is a :class:`DispatchContext` describing the inputs.

Forcing a backend:
- per call, ``backend="cpu"`` on the public op function;
- per op, ``LLM2CLIP_BACKEND_<OP>=<name>`` (e.g. ``LLM2CLIP_BACKEND_CLIP_LOSS=torch``);
- for every op, ``LLM2CLIP_BACKEND=<name>``.
A forced backend that cannot serve raises :class:`BackendUnavailableError` listing its reasons.

An availability check that raises counts as a refusal (dispatch falls back to the next backend), and
is logged as a warning once per backend, check and exception, since it usually is a bug.

Some backends (the Triton interpreter on CPU tensors, the materialising reference) serve only
when forced: they are correct but slow, so automatic dispatch never picks them.

Under ``torch.compile`` the choice is made once, while Dynamo traces the call, and becomes a constant
of the graph (:func:`select_backend` runs the availability checks outside the trace: they import
modules and read the environment, which Dynamo cannot trace). The backends then see
:class:`TensorSpec` descriptions instead of tensors: dtype, device, and the shape with every leading
dimension -1 (it may be dynamic) and the last one exact. A change of ``LLM2CLIP_BACKEND*`` after the
first compiled call does not recompile.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)
# (backend, check, exception type, message) already logged: a crashing probe is reported once, not
# on every call of a hot op.
_REPORTED_CHECK_FAILURES: set[tuple[str, str, str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """A backend was forced (argument or environment) but cannot serve these inputs."""


@dataclass(frozen=True)
class TensorSpec:
    """What a backend check sees of a tensor under torch.compile: no data, leading dims unknown (-1)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def dim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class DispatchContext:
    """What a backend needs to know to accept or refuse a call."""

    tensors: tuple[torch.Tensor | TensorSpec, ...]
    forced: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {t.dtype for t in self.tensors}


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``reasons(ctx)`` returns why it cannot serve (empty list: it can). ``run`` is the callable the op
    invokes; its signature is the op's own business.
    """

    name: str
    run: Callable[..., Any]
    reasons: Callable[[DispatchContext], list[str]]
    description: str = ""

    def not_supported_reasons(self, ctx: DispatchContext) -> list[str]:
        try:
            return list(self.reasons(ctx))
        except Exception as exc:  # a probe that crashes must not take dispatch down with it
            reason = f"availability check failed: {type(exc).__name__}: {exc}"
            # ...but it must not pass for "not supported" silently either: it usually is a bug.
            key = (self.name, getattr(self.reasons, "__qualname__", repr(self.reasons)), type(exc).__name__,
                   str(exc))
            if key not in _REPORTED_CHECK_FAILURES:
                _REPORTED_CHECK_FAILURES.add(key)
                logger.warning("backend %r: %s; dispatch falls back to the next backend", self.name, reason,
                               exc_info=exc)
            return [reason]


@dataclass
class Op:
    name: str
    backends: list[Backend]
    description: str = ""
    # Builds small representative inputs on a device/dtype, so `python -m llm2clip_fast.info` can
    # say which backend would serve there and why the others would not.
    probe: Callable[[torch.device, torch.dtype], tuple[torch.Tensor, ...]] | None = None

    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]

    def get(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise BackendUnavailableError(
            f"{self.name}: unknown backend {name!r}; this op has {self.backend_names()}"
        )


_REGISTRY: dict[str, Op] = {}


def register_op(
    name: str,
    backends: Sequence[Backend],
    description: str = "",
    probe: Callable[[torch.device, torch.dtype], tuple[torch.Tensor, ...]] | None = None,
) -> Op:
    """Register (or replace) an op's ordered backend list."""
    if not backends:
        raise ValueError(f"register_op({name!r}): backends must not be empty")
    op = Op(name=name, backends=list(backends), description=description, probe=probe)
    _REGISTRY[name] = op
    return op


def registered_ops() -> dict[str, Op]:
    return dict(_REGISTRY)


def env_forced_backend(op_name: str) -> str | None:
    """The backend forced for ``op_name`` by the environment, if any (per-op variable wins)."""
    per_op = os.environ.get(f"LLM2CLIP_BACKEND_{op_name.upper()}", "").strip()
    if per_op:
        return per_op
    everywhere = os.environ.get("LLM2CLIP_BACKEND", "").strip()
    return everywhere or None


def select_backend(
    op_name: str,
    tensors: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
    options: dict[str, Any] | None = None,
) -> Backend:
    """Pick the backend that will run ``op_name`` on ``tensors``.

    ``backend`` (argument) beats the environment; without either, the first backend with no reasons.
    Under torch.compile the choice is a constant of the traced graph (see the module docstring).
    """
    if torch.compiler.is_compiling():
        opts = dict(options or {})
        keys = tuple(sorted(opts))
        name = _select_name_while_tracing(
            op_name, tuple(t.dim() for t in tensors),
            tuple(int(t.shape[-1]) if t.dim() else 1 for t in tensors),
            tuple(t.dtype for t in tensors), tuple(t.device for t in tensors), backend,
            keys, tuple(opts[k] for k in keys),
        )
        return _REGISTRY[op_name].get(name)
    return _select_eager(op_name, tensors, backend=backend, options=options)


# Dynamo calls this at trace time and bakes its result into the graph; its arguments must be flat
# tuples of Python constants (nested tuples are not converted).
@torch.compiler.assume_constant_result
def _select_name_while_tracing(
    op_name: str, ndims: tuple[int, ...], last_dims: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
    devices: tuple[torch.device, ...], backend: str | None, option_keys: tuple[str, ...],
    option_values: tuple[Any, ...],
) -> str:
    specs = [TensorSpec((-1,) * (nd - 1) + (last,) if nd else (), dt, dev)
             for nd, last, dt, dev in zip(ndims, last_dims, dtypes, devices)]
    options = dict(zip(option_keys, option_values))
    return _select_eager(op_name, specs, backend=backend, options=options).name  # type: ignore[arg-type]


def _select_eager(
    op_name: str,
    tensors: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
    options: dict[str, Any] | None = None,
) -> Backend:
    op = _REGISTRY.get(op_name)
    if op is None:
        raise KeyError(f"no op named {op_name!r} is registered; known: {sorted(_REGISTRY)}")
    forced = backend or env_forced_backend(op_name)
    opts = dict(options or {})
    if forced:
        # A globally forced backend that this op does not have at all is not an error for this op:
        # LLM2CLIP_BACKEND=cuda must not break ops that have no CUDA kernel. Per-call and per-op
        # forcing are precise, so there an unknown name is an error.
        source_is_global = backend is None and not os.environ.get(f"LLM2CLIP_BACKEND_{op_name.upper()}")
        if source_is_global and forced not in op.backend_names():
            forced = None
    if forced:
        chosen = op.get(forced)
        ctx = DispatchContext(tuple(tensors), forced=True, options=opts)
        why = chosen.not_supported_reasons(ctx)
        if why:
            raise BackendUnavailableError(
                f"{op_name}: backend {forced!r} was forced but cannot serve these inputs: " + "; ".join(why)
            )
        return chosen
    ctx = DispatchContext(tuple(tensors), forced=False, options=opts)
    refusals = []
    for b in op.backends:
        why = b.not_supported_reasons(ctx)
        if not why:
            return b
        refusals.append(f"{b.name}: " + "; ".join(why))
    raise BackendUnavailableError(f"{op_name}: no backend can serve these inputs: " + " | ".join(refusals))


def explain(op_name: str, tensors: Sequence[torch.Tensor], options: dict[str, Any] | None = None) -> list[
    tuple[str, list[str]]
]:
    """For each backend of ``op_name`` in order: its name and why it would not serve (automatic mode)."""
    op = _REGISTRY[op_name]
    ctx = DispatchContext(tuple(tensors), forced=False, options=dict(options or {}))
    return [(b.name, b.not_supported_reasons(ctx)) for b in op.backends]


# Which backend each op's latest call ran on (op name -> backend name). Ops record their choice at
# the call site (``record_selection``) so benches and checks can print what actually ran next to
# their numbers, and a fallback never hides under a fused label.
_LAST_SELECTED: dict[str, str] = {}


def record_selection(op_name: str, chosen: Backend) -> Backend:
    """Remember that ``op_name``'s latest call runs on ``chosen``; returns ``chosen``."""
    _LAST_SELECTED[op_name] = chosen.name
    return chosen


def last_selected(op_name: str) -> str | None:
    """The backend name ``op_name``'s latest call in this process ran on (None before any call)."""
    return _LAST_SELECTED.get(op_name)


def clear_selections() -> None:
    """Forget every recorded choice (a bench calls it before a measured point)."""
    _LAST_SELECTED.clear()
