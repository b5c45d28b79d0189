"""llm2clip_fast: fast LLM2CLIP training.

Fused large-batch contrastive losses, a fused text adapter, 8-bit frozen-LLM inference and a lean
trainer for both LLM2CLIP stages. ``python -m llm2clip_fast.info`` shows what was built and which
backend serves each op on this machine.

The public names below are imported on first use, so ``import llm2clip_fast`` stays cheap (it does
not import transformers or Triton).

Import layering, lowest first; a module imports only from its own layer or lower ones
(``tests/core/test_import_layers.py`` checks every import, module-level and inside functions):

0. this package and its one-job helpers: ``_extensions``, ``atomic_files``, ``fp32_matmul``,
   ``cli_exit_codes``, ``third_party_notices``, ``missing_dependency``, ``redaction``,
   ``safetensors_files``, ``writable_output``;
1. ``kernels`` (the Triton kernels, ``llm2clip_kernels/``), ``data`` (sources, loaders, caches) and
   ``distributed`` (process set-up and the row collectives);
2. ``ops`` (backend dispatch, autograd, the CPU/torch implementations, the global-batch losses);
3. ``losses`` (OpenCLIP-style modules);
4. ``models`` (towers, adapter, LLM encoder, LLM2CLIPModel);
5. ``convert`` (released checkpoints in and out);
6. ``eval`` (held-out and benchmark evaluation of saved models, usable without the trainer);
7. ``train`` (the trainers and the command lines, ``eval``'s included) and ``info``; ``bench/`` sits
   outside the package, above all.

No modules import each other in a circle, of any length (the same test checks it).
"""

from __future__ import annotations

import importlib
from typing import Any

from .third_party_notices import quiet_unactionable_notices

__version__ = "0.1.0"

quiet_unactionable_notices()

_LAZY = {
    "clip_loss": "llm2clip_fast.ops.clip_loss",
    "siglip_loss": "llm2clip_fast.ops.siglip_loss",
    "masked_mean_pool": "llm2clip_fast.ops.masked_mean_pool",
    "text_adapter": "llm2clip_fast.ops.adapter",
    "ClipLoss": "llm2clip_fast.losses",
    "SigLipLoss": "llm2clip_fast.losses",
    "TextAdapter": "llm2clip_fast.models.text_adapter",
    "TextAdapterReference": "llm2clip_fast.models.text_adapter",
    "LLMTextEncoder": "llm2clip_fast.models.llm_encoder",
    "LLM2CLIPModel": "llm2clip_fast.models.llm2clip",
    "EmbeddingCache": "llm2clip_fast.data.embedding_cache",
    "open_source": "llm2clip_fast.data.sources",
    "build_loader": "llm2clip_fast.data.loader",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llm2clip_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
