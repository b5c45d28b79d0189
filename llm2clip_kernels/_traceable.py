"""Kernel launches that torch.compile can trace through ``torch.library.triton_op``.

``traceable(kernel)[grid](...)`` launches ``kernel`` as ``kernel[grid](...)`` does. While a dispatch
mode is active (a ``triton_op`` traced with fake or functional tensors by torch.compile) it returns
``torch.library.wrap_triton(kernel)``, which records the launch in the graph instead, so Inductor sees
the kernel. Everywhere else the plain kernel runs: a wrapped kernel called eagerly goes through a
higher-order op that registers its arguments in a side table on every launch (slower, and it grows).
Under ``TRITON_INTERPRET=1`` the kernel is always returned as is: interpreted kernels run eagerly only
(older torch versions' ``wrap_triton`` rejects them), and the ops that call them are registered as
plain custom ops there (llm2clip_fast/ops/_library.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# torch < 2.6 has no wrap_triton (nor triton_op): there the kernels launch as plain kernels.
_wrap_triton = getattr(torch.library, "wrap_triton", None)


def traceable(kernel: Any) -> Any:
    if _INTERPRET or _wrap_triton is None or torch._C._len_torch_dispatch_stack() == 0:
        return kernel
    return _wrap_triton(kernel)
