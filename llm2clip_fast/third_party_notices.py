"""Third-party notices users cannot act on: log records filtered by exact logger and message prefix,
Python warnings by exact category, emitting module and message start.

Only what is listed here is dropped; every other warning of the same libraries still shows. Each
entry says why it is noise for llm2clip_fast users.
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, message prefix, why it is dropped)
UNACTIONABLE: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "bitsandbytes >= 0.49 tries, at import on AVX512-BF16 CPUs, to fetch a 4-bit GEMM from the hub "
        "through the optional `kernels` package; llm2clip_fast uses LLM.int8 (not 4-bit) and never "
        "reaches a hub, so the notice appears on every run and asks for something that would not help",
    ),
)


# (warning category, emitting module (regex), message start, why it is dropped)
UNACTIONABLE_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (
        FutureWarning,
        r"transformers\.modeling_utils",
        "`is_gradient_checkpointing` is deprecated",
        "peft (0.21) probes the deprecated transformers property while it wraps a model for LoRA; the "
        "warning names an attribute llm2clip_fast never uses and fires on every stage-1 run",
    ),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_unactionable_notices() -> None:
    """Install the filters (idempotent). Loggers are created here if their library is not yet
    imported, so the filter is in place before the library's import-time warning."""
    for name, prefix, _why in UNACTIONABLE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
    for category, module, start, _why in UNACTIONABLE_WARNINGS:
        # filterwarnings puts an identical filter only once at the front (idempotent)
        warnings.filterwarnings("ignore", message=re.escape(start), category=category, module=module)
