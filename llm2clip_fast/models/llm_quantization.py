"""8-bit weight-and-activation inference of the frozen LLM, with the 16-bit layers chosen by fidelity.

:func:`quantize_encoder` turns an :class:`~llm2clip_fast.models.llm_encoder.LLMTextEncoder`'s linear
layers into :class:`~llm2clip_fast.models.w8a8.W8A8Linear` (``w8a8-int8`` or ``w8a8-fp8``):

1. Calibration: the captions of :func:`calibration_captions` (fixed and shipped, so ``embed`` and
   ``eval`` quantise the same weights identically) run through the 16-bit model once; every linear
   layer's input records its per-channel max |x|, and the 16-bit embeddings are kept as reference.
2. SmoothQuant (Xiao et al. 2023): each layer's input channel j is divided by
   ``s_j = max|x_j|^a / max|W_:,j|^(1-a)`` (a = 0.5) and its weight column multiplied by it, which
   moves an outlier channel's range (LLMs' "massive activations") from the per-token activation scale
   into the per-channel weight scale; the division rides in the activation quantisation pass.
3. Every linear layer becomes 8-bit; while the calibration embeddings miss :data:`CALIBRATION_TARGETS`
   (stricter than the tests' targets, as the calibration captions are not the data), the quarter of
   the remaining 8-bit layers with the largest relative output error (measured on every fourth
   calibration caption) goes back to 16-bit, and the fidelity is measured again.

The result (:class:`QuantizationReport`: mode, smoothing, the calibration set's hash, the layers kept in
16-bit, the calibration fidelity) goes into the embedding cache's metadata and encoder fingerprint; a
later load with ``keep=`` the recorded layers reproduces the same model without the search.

``llm-int8`` (bitsandbytes' LLM.int8, the ``--load-in-8bit`` spelling) is a load-time option of
:meth:`LLMTextEncoder.from_pretrained`, not this module's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .w8a8 import MODES, W8A8Linear

QUANTIZE_CHOICES = ("none", "llm-int8", "w8a8-int8", "w8a8-fp8")
SMOOTHING_ALPHA = 0.5
CALIBRATION_RECORDS = 64  # demo records: a short and a long caption each
# The targets each mode must meet on unseen captions are 0.999 / 0.99 / 0.97 (raw mean / centred mean /
# centred min); the search aims higher on the calibration captions.
CALIBRATION_TARGETS = {"raw_mean": 0.9995, "centred_mean": 0.995, "centred_min": 0.985}


def embedding_fidelity(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How close ``emb`` (N, H) is to ``ref`` (N, H), row by row: raw cosine mean, and the cosine after
    removing ``ref``'s mean embedding from both (``centred_*``: LLM embeddings share a few huge
    dimensions, which carry a raw cosine by themselves)."""
    emb, ref = emb.double(), ref.double()
    raw = F.cosine_similarity(emb, ref, dim=-1)
    mean = ref.mean(dim=0, keepdim=True)
    centred = F.cosine_similarity(emb - mean, ref - mean, dim=-1)
    return {"raw_mean": float(raw.mean()), "centred_mean": float(centred.mean()),
            "centred_min": float(centred.min())}


def meets(fidelity: dict[str, float], targets: dict[str, float]) -> bool:
    return all(fidelity[k] >= v for k, v in targets.items())


def calibration_captions() -> list[str]:
    """The fixed calibration set: the short and long caption of the first 64 demo training records."""
    from ..data.demo import demo_records

    texts: list[str] = []
    for record in demo_records("train", CALIBRATION_RECORDS, image_size=8):
        texts += [record.captions["short"], record.captions["long"]]
    return texts


@dataclass
class QuantizationReport:
    """What :func:`quantize_encoder` did; JSON-able with :meth:`as_dict`."""

    mode: str
    smoothing_alpha: float
    calibration_sha256: str
    calibration_texts: int
    quantized: int
    kept_16bit: list[str] = field(default_factory=list)
    calibration_fidelity: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    # A head (lm_head, an MLM decoder) never runs when the encoder pools hidden states: left alone.
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith(("lm_head", "decoder"))}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _calibrate(encoder: Any, texts: list[str],
               names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """16-bit embeddings of ``texts`` and each named linear layer's per-input-channel max |x|."""
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                   name: str = name) -> None:
            x = inputs[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        hooks.append(encoder.model.get_submodule(name).register_forward_hook(record))
    try:
        ref = encoder.encode(texts, show_progress=False)
    finally:
        for h in hooks:
            h.remove()
    return ref, absmax


def smoothing_factors(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA
                      ) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``max|x_j|^alpha / max|W_:,j|^(1-alpha)`` (clamped)."""
    w = weight.detach().abs().float().amax(dim=0).clamp_min(1e-5)
    s = input_absmax.float().to(w.device).clamp_min(1e-5).pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(1e-4, 1e4)


def _layer_errors(encoder: Any, texts: list[str], originals: dict[str, nn.Linear]) -> dict[str, float]:
    """Relative output error (norm) of each 8-bit layer against its 16-bit original, on ``texts``."""
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in originals}
    hooks = []
    for name, original in originals.items():
        def measure(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                    name: str = name, original: nn.Linear = original):
            want = original(inputs[0]).float()
            sums[name][0] += float((output.float() - want).pow(2).sum())
            sums[name][1] += float(want.pow(2).sum())
        hooks.append(encoder.model.get_submodule(name).register_forward_hook(measure))
    try:
        encoder.encode(texts, show_progress=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: math.sqrt(e / max(n, 1e-30)) for name, (e, n) in sums.items()}


def quantize_encoder(encoder: Any, mode: str, *, calibration: Sequence[str] | None = None,
                     keep: Sequence[str] | None = None, alpha: float = SMOOTHING_ALPHA,
                     targets: dict[str, float] | None = None) -> QuantizationReport:
    """Quantise ``encoder.model``'s linear layers in place (see the module docstring); returns the report.

    ``keep``: the layers to leave in 16-bit, skipping the search (what a previous report recorded).
    ``calibration``: captions instead of :func:`calibration_captions`. ``targets``: instead of
    :data:`CALIBRATION_TARGETS`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    texts = list(calibration) if calibration is not None else calibration_captions()
    if not texts:
        raise ValueError("calibration must hold at least one caption")
    targets = dict(CALIBRATION_TARGETS if targets is None else targets)
    layers = _linear_layers(encoder.model)
    unknown = sorted(set(keep or ()) - set(layers))
    if unknown:
        raise ValueError(f"keep names layers this model does not have: {unknown[:5]}")
    ref, absmax = _calibrate(encoder, texts, list(layers))
    originals: dict[str, nn.Linear] = {}
    for name, linear in layers.items():
        if keep is not None and name in keep:
            continue
        smooth = smoothing_factors(absmax[name], linear.weight, alpha)
        _replace(encoder.model, name, W8A8Linear(linear, mode, smooth))
        originals[name] = linear
    fidelity = embedding_fidelity(encoder.encode(texts, show_progress=False), ref)
    while keep is None and originals and not meets(fidelity, targets):
        # Ranking the layers needs fewer captions than judging the embeddings.
        errors = _layer_errors(encoder, texts[::4] or texts, originals)
        worst = sorted(errors, key=errors.get, reverse=True)[:max(1, math.ceil(len(originals) / 4))]
        for name in worst:
            _replace(encoder.model, name, originals.pop(name))
        fidelity = embedding_fidelity(encoder.encode(texts, show_progress=False), ref)
    kept = sorted(set(layers) - set(originals))
    return QuantizationReport(mode=mode, smoothing_alpha=alpha, calibration_sha256=_texts_sha256(texts),
                              calibration_texts=len(texts), quantized=len(originals), kept_16bit=kept,
                              calibration_fidelity=fidelity)
