"""Registration of the backend primitives as ``torch.library`` custom ops (namespace ``llm2clip_fast``).

Every primitive that torch.compile cannot trace by itself (a Triton launch, a raw CUDA launch, a C++
op) is a custom op with a fake (shape/dtype) implementation, so Dynamo traces a model that calls the
public ops in one graph. The autograd formulas stay in the ops' ``torch.autograd.Function`` classes,
which Dynamo traces too: their forward and backward call these primitives. Backend choice stays
outside the ops (:func:`llm2clip_fast.ops._backend.select_backend`): each op is one backend's
computation.

Triton primitives are registered with ``torch.library.triton_op`` so Inductor sees their kernels
(the launchers wrap each kernel in ``torch.library.wrap_triton``). Under ``TRITON_INTERPRET=1`` they
are plain custom ops instead: an interpreted kernel cannot be traced with fake tensors, so there the
op is opaque to the compiler and its kernels run eagerly, as they do outside torch.compile. So they
are where Triton is not installed (the op then fails when called, and dispatch never picks it) and on
torch < 2.6, which has no ``triton_op``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._availability import triton_import_problem, triton_interpreter_on

NAMESPACE = "llm2clip_fast"


def define_op(name: str, fn: Callable[..., object], fake: Callable[..., object], *,
              triton: bool = False) -> Callable[..., object]:
    """Register ``fn`` as ``llm2clip_fast::<name>`` (no mutated inputs) with ``fake``; returns the op.

    ``fn``'s annotations give the schema; its outputs must be new tensors (never an input or a view
    of one). ``triton=True``: ``fn`` launches Triton kernels through ``wrap_triton`` and is traceable
    with fake tensors outside the interpreter.
    """
    qualname = f"{NAMESPACE}::{name}"
    if triton and _triton_op_usable():
        op = torch.library.triton_op(qualname, fn, mutates_args=())
    else:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
    # For a triton_op this replaces the fake that traces ``fn``: one shape function, the one
    # opcheck tests on CPU, serves Dynamo on every device.
    op.register_fake(fake)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def _triton_op_usable() -> bool:
    return (hasattr(torch.library, "triton_op") and triton_import_problem() is None
            and not triton_interpreter_on())
