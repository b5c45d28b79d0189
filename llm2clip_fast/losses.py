"""nn.Module wrappers of the fused contrastive losses, drop-in for OpenCLIP's loss modules."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .ops.clip_loss import clip_loss
from .ops.siglip_loss import siglip_loss


def _check_process_group(rank: int, world_size: int, process_group: Any) -> None:
    """A module built for world_size > 1 must run inside a matching torch.distributed group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"the loss was built with world_size={world_size} but torch.distributed is not initialised; "
            "call llm2clip_fast.distributed.init_distributed_from_env() first"
        )
    actual_world, actual_rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    if (actual_rank, actual_world) != (rank, world_size):
        raise ValueError(
            f"the loss was built with rank={rank}, world_size={world_size} but this process is rank "
            f"{actual_rank} of {actual_world} in its process group"
        )


def _check_rank_world(rank: int, world_size: int, use_horovod: bool) -> None:
    """OpenCLIP's rank/world_size/use_horovod constructor arguments, checked the same for both losses."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if use_horovod:
        raise ValueError("use_horovod=True is not supported; launch with torchrun (torch.distributed)")


class ClipLoss(nn.Module):
    """Drop-in for OpenCLIP's ``ClipLoss`` (single process) that never builds the B x B logits.

    ``forward(image_features, text_features, logit_scale, output_dict=False)`` returns the mean of
    the image->text and text->image cross-entropies over the in-batch similarities, as a float32
    0-dim tensor (float64 for float64 features), or ``{"contrastive_loss": loss}`` with
    ``output_dict=True``. image_features, text_features: (B, D); logit_scale: the multiplier
    (already exponentiated), a 0-dim tensor or a float.

    The constructor takes OpenCLIP's keyword arguments. ``local_loss``, ``gather_with_grad`` and
    ``cache_labels`` change nothing in a single process (there are no labels to cache here).
    ``world_size > 1`` computes the global-batch loss over the torch.distributed group
    (``process_group``, default group) with :func:`llm2clip_fast.ops.clip_loss.clip_loss_global`,
    equal to OpenCLIP's ``local_loss=True, gather_with_grad=True`` (the one multi-process
    combination accepted; see that function for the exact convention); ``use_horovod`` raises
    ValueError. ``backend`` forces a backend of :func:`llm2clip_fast.ops.clip_loss.clip_loss`;
    ``memory_budget`` is its memory budget (bytes or e.g. '8GiB'; default: the environment's or a
    quarter of the free memory).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str | None = None,
        process_group: Any = None,
        memory_budget: int | str | None = None,
    ) -> None:
        super().__init__()
        _check_rank_world(rank, world_size, use_horovod)
        if world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError(
                "world_size > 1 is supported by ClipLoss only with local_loss=True and gather_with_grad=True "
                f"(OpenCLIP's large-batch setting); got local_loss={local_loss}, "
                f"gather_with_grad={gather_with_grad}"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.process_group = process_group
        self.memory_budget = memory_budget

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        distributed = self.world_size > 1
        if distributed:
            _check_process_group(self.rank, self.world_size, self.process_group)
        loss = clip_loss(image_features, text_features, logit_scale, reduction="mean", backend=self.backend,
                         memory_budget=self.memory_budget, distributed=distributed,
                         process_group=self.process_group)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Drop-in for OpenCLIP's ``SigLipLoss`` that never builds the B x B logits.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)`` returns
    the sum over all pairs of ``-logsigmoid(y * (logit_scale * <image, text> + logit_bias))``
    (y = +1 for matching pairs, -1 otherwise) divided by the number of images, as a float32 0-dim
    tensor (float64 for float64 features), or ``{"contrastive_loss": loss}`` with
    ``output_dict=True``. image_features, text_features: (B, D); logit_scale: the multiplier
    (already exponentiated) and logit_bias: 0-dim tensors or floats.

    The constructor takes OpenCLIP's arguments. ``world_size > 1`` computes each rank's images
    against the texts of every rank in the torch.distributed group (``process_group``, default
    group) with :func:`llm2clip_fast.ops.siglip_loss.siglip_loss_global`; OpenCLIP's exchange
    variants (``dist_impl`` 'bidir', 'shift', 'reduce', 'gather', or ``bidir``) all compute that
    same loss and gradients, so they are accepted and change nothing. ``cache_labels`` changes
    nothing (no labels are built); ``use_horovod`` raises ValueError. ``backend`` forces a backend
    of :func:`llm2clip_fast.ops.siglip_loss.siglip_loss`; ``memory_budget`` caps its chunk workspaces.
    """

    _DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        bidir: bool = True,
        use_horovod: bool = False,
        *,
        backend: str | None = None,
        process_group: Any = None,
        memory_budget: int | str | None = None,
    ) -> None:
        super().__init__()
        _check_rank_world(rank, world_size, use_horovod)
        if dist_impl not in self._DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self._DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or ("bidir" if bidir else "shift")
        self.bidir = bidir
        self.use_horovod = use_horovod
        self.backend = backend
        self.process_group = process_group
        self.memory_budget = memory_budget

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        distributed = self.world_size > 1
        if distributed:
            _check_process_group(self.rank, self.world_size, self.process_group)
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction="mean",
                           backend=self.backend, memory_budget=self.memory_budget, distributed=distributed,
                           process_group=self.process_group)
        return {"contrastive_loss": loss} if output_dict else loss


__all__ = ["ClipLoss", "SigLipLoss"]
