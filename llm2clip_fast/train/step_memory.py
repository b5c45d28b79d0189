"""Gradient checkpointing of the vision tower, chosen by memory.

Checkpointing a transformer layer frees the activations its backward needs (keeping only its input) at
the price of running its forward again in backward: ~1/3 more tower work per checkpointed layer. So it
should be on exactly as far as memory requires:

- ``none`` when the micro-batch's activations fit;
- ``selective``: the first ``k`` layers checkpointed, ``k`` the fewest that make them fit (the memory a
  layer frees is the same whichever layer it is, and ``k`` of ``L`` layers cost ``k/L`` of full
  checkpointing's recompute);
- ``full``: every layer, when nothing less fits.

The activations are measured, not modelled: :func:`profile_activations` runs the tower's forward on one
and on two images (with the run's autocast) and records every tensor autograd saves, attributed to the
layer that saved it (``saved_tensors_hooks``; parameters and their autocast copies do not grow with the
batch and drop out of the difference). :func:`plan_checkpointing` scales that to the micro-batch and
compares it with the memory the device has left (:func:`device_budget_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..device_memory import free_and_total_bytes

MODES = ("auto", "none", "selective", "full")
# Kept free of the estimate: allocator fragmentation, cuBLAS/cuDNN workspaces, NCCL buffers.
_MARGIN_FRACTION = 0.10
_MARGIN_MIN_BYTES = 1 << 30


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps per image of the micro-batch.

    layers: saved by each transformer layer (in order); layer_inputs: each layer's input (what it
    still holds when checkpointed); other: saved outside the layers (stem, pooling head, projection,
    text side).
    """

    layers: tuple[int, ...]
    layer_inputs: tuple[int, ...]
    other: int

    @property
    def total(self) -> int:
        return sum(self.layers) + self.other


def _saved_bytes(run: Callable[[int], Any], batch: int, layers: nn.ModuleList | nn.Sequential,
                 exclude: set[int]) -> tuple[list[int], list[int], int]:
    """(bytes saved inside each layer, bytes of each layer's input, bytes saved elsewhere) for one call
    ``run(batch)``; tensors are counted once per storage, parameters never."""
    current = [-1]
    seen: set[int] = set()
    per_layer = [0] * len(layers)
    inputs = [0] * len(layers)
    other = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and ptr not in exclude and t.device.type != "meta":
            seen.add(ptr)
            if current[0] >= 0:
                per_layer[current[0]] += storage.nbytes()
            else:
                other[0] += storage.nbytes()
        return t

    handles = []
    for i, layer in enumerate(layers):
        def pre(_module, args, kwargs, i=i):
            current[0] = i
            hidden = args[0] if args else next(iter(kwargs.values()))
            inputs[i] = hidden.untyped_storage().nbytes()

        def post(_module, _args, _output):
            current[0] = -1

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run(batch)
        del out
    finally:
        for h in handles:
            h.remove()
    return per_layer, inputs, other[0]


def profile_activations(model: nn.Module, device: torch.device, autocast: Callable[[], Any],
                        text_inputs: Callable[[int], tuple[torch.Tensor, ...]] | None = None
                        ) -> ActivationProfile:
    """Measure what one image costs in saved activations in ``model`` (an
    :class:`~llm2clip_fast.models.llm2clip.LLM2CLIPModel`, layers neither checkpointed nor compiled),
    from a forward on one and on two random images under ``autocast()``. ``text_inputs(batch)``: the
    text side's inputs, to count its activations too (None: image side only)."""
    tower = model.vision
    layers = tower.layer_modules()
    size = tower.image_size
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def run(batch: int) -> Any:
        gen = torch.Generator(device=device).manual_seed(0)
        pixels = torch.randn(batch, 3, size, size, device=device, generator=gen)
        with autocast():
            image = model.encode_image(pixels, normalize=True)
            if text_inputs is None:
                return image
            return image, model.encode_text(*text_inputs(batch), normalize=True)

    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            one = _saved_bytes(run, 1, layers, exclude)
            two = _saved_bytes(run, 2, layers, exclude)
    finally:
        model.train(was_training)
    slope = [max(0, b - a) for a, b in zip(one[0], two[0])]
    inputs = [max(0, b - a) for a, b in zip(one[1], two[1])]
    return ActivationProfile(tuple(slope), tuple(inputs), max(0, two[2] - one[2]))


def device_budget_bytes(device: torch.device, state_bytes: int) -> tuple[int, int]:
    """(bytes the step's activations may use, bytes the device has free now): the free memory (CUDA:
    ``mem_get_info``; CPU: ``MemAvailable``) less ``state_bytes`` not yet allocated (gradients, optimizer
    state) and a margin of 10% of the device (at least 1 GiB) for workspaces and fragmentation."""
    free, total = free_and_total_bytes(device)
    margin = max(_MARGIN_MIN_BYTES, int(_MARGIN_FRACTION * total))
    return max(0, free - state_bytes - margin), free


@dataclass(frozen=True)
class CheckpointPlan:
    """What was chosen: ``mode`` (none / selective / full), ``layers`` checkpointed (the first ones),
    the estimated activation bytes of the micro-batch with this plan and without checkpointing, the
    budget, and why."""

    mode: str
    layers: int
    num_layers: int
    estimate_bytes: int
    uncheckpointed_bytes: int
    budget_bytes: int | None
    why: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        gib = 2**30
        budget = f"{self.budget_bytes / gib:.3g} GiB" if self.budget_bytes is not None else "not measured"
        return (f"gradient checkpointing: {self.mode} ({self.layers}/{self.num_layers} layers; activations "
                f"~{self.estimate_bytes / gib:.3g} GiB, {self.uncheckpointed_bytes / gib:.3g} GiB without; "
                f"budget {budget}): {self.why}")


def estimate_bytes(profile: ActivationProfile, batch: int, layers: int, extra_bytes: int = 0) -> int:
    """Activation bytes of a ``batch``-image micro-batch with the first ``layers`` layers checkpointed:
    the larger of what the forward leaves for backward (checkpointed layers keep only their inputs) and
    what backward holds while it rebuilds a checkpointed layer (by then the later layers are freed)."""
    kept = profile.layers[:layers]
    inputs = profile.layer_inputs[:layers]
    after_forward = profile.total - sum(kept) + sum(inputs)
    rebuilding = profile.other + sum(inputs) + max(kept, default=0)
    return batch * max(after_forward, rebuilding) + extra_bytes


def plan_checkpointing(request: str, profile: ActivationProfile | None, batch: int, num_layers: int,
                       budget_bytes: int | None, extra_bytes: int = 0) -> CheckpointPlan:
    """The checkpointing for ``request`` (one of :data:`MODES`): ``none`` and ``full`` as asked;
    ``selective``: the fewest layers (at least 1, at most all but one) that fit ``budget_bytes``;
    ``auto``: none when the activations fit, else the fewest layers that fit (all of them: ``full``).
    ``extra_bytes``: other memory of the step that grows with the batch (the loss)."""
    if request not in MODES:
        raise ValueError(f"--grad-checkpointing must be one of {MODES}, got {request!r}")
    if profile is None:
        if request in ("auto", "selective"):
            raise ValueError(f"gradient checkpointing {request!r} needs an activation profile")
        layers = num_layers if request == "full" else 0
        return CheckpointPlan(request, layers, num_layers, 0, 0, budget_bytes, "as asked")

    def est(k: int) -> int:
        return estimate_bytes(profile, batch, k, extra_bytes)

    base = est(0)

    def plan(mode: str, k: int, why: str) -> CheckpointPlan:
        return CheckpointPlan(mode, k, num_layers, est(k), base, budget_bytes, why)

    if request == "none":
        return plan("none", 0, "as asked")
    if request == "full":
        return plan("full", num_layers, "as asked")
    fits = [k for k in range(num_layers + 1) if budget_bytes is None or est(k) <= budget_bytes]
    if request == "selective":
        candidates = [k for k in fits if 1 <= k < num_layers]
        k = candidates[0] if candidates else max(1, num_layers - 1)
        why = ("the fewest layers that fit the budget" if candidates
               else "as asked, though no selective choice fits the budget estimate")
        return plan("selective", k, why)
    if fits and fits[0] == 0:
        return plan("none", 0, "the micro-batch's activations fit")
    if fits:
        k = fits[0]
        mode = "full" if k == num_layers else "selective"
        return plan(mode, k, f"without it the activations (~{base / 2**30:.3g} GiB) exceed the budget; "
                             f"{k} layer(s) are the fewest that fit")
    return plan("full", num_layers, "even full checkpointing exceeds the budget estimate: expect an out-of-"
                                     "memory error; lower --batch-size and raise --grad-accum")


def state_bytes(model: nn.Module, optimizer_states: int = 2) -> int:
    """Bytes gradients and AdamW state will take (not yet allocated before the first step)."""
    return sum(p.numel() * p.element_size() * (1 + optimizer_states) for p in model.parameters()
               if p.requires_grad)


def loss_bytes(local_batch: int, global_batch: int) -> int:
    """An upper bound on the contrastive loss's memory: the fp32 logits block of this rank's rows
    against the global batch and its gradient (losses that never form it take less)."""
    return 2 * 4 * local_batch * global_batch


__all__ = ["MODES", "ActivationProfile", "CheckpointPlan", "device_budget_bytes", "estimate_bytes",
           "loss_bytes", "plan_checkpointing", "profile_activations", "state_bytes"]

