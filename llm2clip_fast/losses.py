"""nn.Module wrappers of the fused contrastive losses, drop-in for OpenCLIP's loss modules."""

from __future__ import annotations

from torch import Tensor, nn

from .ops.clip_loss import clip_loss


class ClipLoss(nn.Module):
    """Drop-in for OpenCLIP's ``ClipLoss`` (single process) that never builds the B x B logits.

    ``forward(image_features, text_features, logit_scale, output_dict=False)`` returns the mean of
    the image->text and text->image cross-entropies over the in-batch similarities, as a float32
    0-dim tensor (float64 for float64 features), or ``{"contrastive_loss": loss}`` with
    ``output_dict=True``. image_features, text_features: (B, D); logit_scale: the multiplier
    (already exponentiated), a 0-dim tensor or a float.

    The constructor takes OpenCLIP's keyword arguments. ``local_loss``, ``gather_with_grad`` and
    ``cache_labels`` change nothing in a single process (there are no labels to cache here);
    ``world_size > 1`` and ``use_horovod`` raise ValueError. ``backend`` forces a backend of
    :func:`llm2clip_fast.ops.clip_loss.clip_loss`.
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
    ) -> None:
        super().__init__()
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if world_size > 1 or use_horovod:
            raise ValueError(
                "world_size > 1 is not supported by ClipLoss in this version; it computes the "
                "single-process loss over the features it is given. For a global batch, gather the "
                "features across ranks before calling it, or use a distributed loss from "
                "llm2clip_fast.distributed where your version provides one."
                + (" use_horovod=True is not supported either." if use_horovod else "")
            )
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        loss = clip_loss(image_features, text_features, logit_scale, reduction="mean", backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


__all__ = ["ClipLoss"]
