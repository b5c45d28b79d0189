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
   ``safetensors_files``, ``writable_output``, ``device_memory``;
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

Where one op lives. Each op is split only where the language or the device changes (Python dispatch,
Triton, C++, CUDA) and its pieces are named after it: the losses and the pool by the op's full name,
``text_adapter`` by ``adapter`` and ``w8a8_linear`` by ``quantize`` / ``int8`` (noted below; the
renames would touch every importer for no change in meaning).

- ``clip_loss`` / ``siglip_loss``: ``ops/<op>.py`` (input checks, backend dispatch, autograd, the torch
  and chunked paths, ``<op>_global`` over the global batch; launchers as ``torch.ops.llm2clip_fast.*``);
  ``llm2clip_kernels/<op>.py`` (Triton, installed as ``llm2clip_fast.kernels``); ``csrc/cpu/<op>.cpp``
  (C++ CPU; CLIP's vectorised epilogues in ``csrc/cpu/clip_epilogue_*``, built once per ISA with
  ``csrc/cpu/isa_*.h``); ``ops/reference.py``
  (``<op>_reference``, plain torch, what tests compare with); ``ops/global_batch_ring.py`` (the rank
  ring both global-batch losses share); ``losses.py`` (``ClipLoss`` / ``SigLipLoss``, OpenCLIP-style
  modules); shared pieces: ``ops/loss_inputs.py`` (argument checks), ``ops/_chunking.py``,
  ``ops/_chunk_schedule.py``, ``ops/_overlap.py``.
- ``masked_mean_pool``: ``ops/masked_mean_pool.py``, ``llm2clip_kernels/masked_mean_pool.py``,
  ``csrc/cpu/masked_mean_pool.cpp``, ``csrc/cuda/masked_mean_pool.cu`` (the one raw CUDA kernel),
  ``masked_mean_pool_reference`` in ``ops/reference.py``.
- ``text_adapter``: ``ops/adapter.py``, ``llm2clip_kernels/adapter.py``, ``csrc/cpu/adapter_cpu.cpp``
  (on the row kernels ``csrc/cpu/row_kernels_*``); module and reference: ``TextAdapter`` /
  ``TextAdapterReference`` in ``models/text_adapter.py``.
- ``w8a8_linear`` (8-bit frozen-LLM GEMMs): ``ops/w8a8_linear.py``, ``llm2clip_kernels/quantize.py``
  (row quantise / dequantise around the GEMM), ``csrc/cpu/int8_cpu.cpp`` (on the same row kernels); its
  ``torch`` backend is the reference; the modules that use it: ``models/w8a8.py``.

Tests: ``tests/ops/test_<op>.py``; benchmarks: ``bench/loss_throughput.py`` (both losses),
``bench/adapter_throughput.py``, ``bench/embed_throughput.py`` (pool, 8-bit); ``python -m
llm2clip_fast.info`` lists each op's backends.
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
