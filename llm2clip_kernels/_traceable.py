"""Kernel launches that torch.compile can trace through ``torch.library.triton_op``.

``traceable(kernel)[grid](...)`` launches ``kernel`` as ``kernel[grid](...)`` does; while a
``triton_op`` is traced with fake tensors (torch.compile) it records the launch in the graph instead,
so Inductor sees the kernel. Under ``TRITON_INTERPRET=1`` the kernel is returned as is: interpreted
kernels run eagerly only (older torch versions' ``wrap_triton`` rejects them), and the ops that call
them are registered as plain custom ops there (llm2clip_fast/ops/_library.py).
"""

from __future__ import annotations

import os
from typing import Any

from torch.library import wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def traceable(kernel: Any) -> Any:
    return kernel if _INTERPRET else wrap_triton(kernel)
