"""The CLIP and SigLIP losses over the global batch of all ranks, from each rank's local features.

:func:`clip_loss_global` and :func:`siglip_loss_global` run the fused local primitives on each rank's
local-rows x global-columns block, with the row collectives of :mod:`llm2clip_fast.distributed`:
O(B_global * D) memory per rank, the block itself never held. They stay outside torch.compile graphs
(``torch.compiler.disable``): they gather batch sizes to the host and run collectives inside autograd
Functions, which Dynamo cannot trace (it fails hard on the process group object rather than breaking
the graph). A compiled model that calls them gets a graph break there; ``fullgraph=True`` refuses. The
local losses compile without graph breaks. ``clip_loss(..., distributed=True)`` and
``siglip_loss(..., distributed=True)`` (and the OpenCLIP-style modules in :mod:`llm2clip_fast.losses`)
call these.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import (
    all_gather_rows,
    check_collective_device,
    gather_batch_sizes,
    is_distributed,
    logsumexp_across_ranks,
    reduce_scatter_rows,
)
from .loss_inputs import check_bias, check_pair, check_scale


def _require_process_group() -> None:
    if not is_distributed():
        raise RuntimeError(
            "a distributed loss was requested (distributed=True or a process_group) but torch.distributed "
            "is not initialised; call init_distributed_from_env() first (or drop distributed=True)"
        )


def _checked_features(image: torch.Tensor, text: torch.Tensor, reduction: str,
                      group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks both global losses run before any collective; the features in one common dtype."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    _require_process_group()
    check_pair(image, text, "image_features", "text_features", same_batch=True)
    # The collectives below take tensors on the features' device: say so before NCCL does.
    check_collective_device(image.device, group, require_current=False)
    if image.dtype != text.dtype:
        common = torch.promote_types(image.dtype, text.dtype)
        image, text = image.to(common), text.to(common)
    return image, text


def _local_batch_sizes(image: torch.Tensor, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's local batch size (a collective); an empty rank is an error on every rank."""
    sizes = gather_batch_sizes(image.shape[0], image.device, group)
    if min(sizes) == 0:
        raise ValueError(f"every rank needs a non-empty local batch; local batch sizes are {sizes}")
    return sizes


def _local_row_weights(grad_out: torch.Tensor, reduction: str, m: int) -> torch.Tensor:
    """Per-row upstream gradient of a reduced loss, as an (m,) vector."""
    if reduction == "mean":
        return (grad_out.reshape(()) / m).expand(m)
    if reduction == "sum":
        return grad_out.reshape(()).expand(m)
    return grad_out


class _ClipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, reduction, backend, group, sizes):  # type: ignore[override]
        from .clip_loss import clip_lse_forward

        rank = dist.get_rank(group)
        offset = sum(sizes[:rank])
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        text_all = all_gather_rows(text, sizes, group)
        row_lse, col_lse_part = clip_lse_forward(image, text_all, s, backend=backend)
        col_lse = logsumexp_across_ranks(col_lse_part, group)
        diag = torch.einsum("bd,bd->b", image.to(acc), text.to(acc))
        per_sample = 0.5 * (row_lse + col_lse[offset: offset + image.shape[0]]) - s * diag
        ctx.save_for_backward(image, text, text_all, s, row_lse, col_lse, diag)
        ctx.reduction, ctx.backend, ctx.group, ctx.sizes = reduction, backend, group, sizes
        ctx.scale_dtype = scale.dtype
        if reduction == "mean":
            return per_sample.mean()
        return per_sample.sum() if reduction == "sum" else per_sample

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        from .clip_loss import clip_lse_backward

        image, text, text_all, s, row_lse, col_lse, diag = ctx.saved_tensors
        group, sizes = ctx.group, ctx.sizes
        g = _local_row_weights(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        coef = 0.5 * g
        # Text j's term (its column LSE) belongs to the rank owning text j, with that rank's upstream
        # gradient: the column coefficients are every rank's row coefficients, gathered.
        col_coef = all_gather_rows(coef, sizes, group)
        d_image, d_text_all, d_scale = clip_lse_backward(
            image, text_all, s, row_lse, col_lse, coef, col_coef, backend=ctx.backend
        )
        d_text = reduce_scatter_rows(d_text_all, sizes, group)
        del d_text_all
        gs = (g * s)[:, None]
        d_image = d_image - gs * text.to(s.dtype)
        d_text = d_text - gs * image.to(s.dtype)
        d_scale = d_scale - (g * diag).sum()
        # The blocks of all ranks together give d(sum_r L_r)/d(scale); each rank returns the rank
        # average, which is what gradient averaging (DDP) makes of OpenCLIP's per-rank values.
        dist.all_reduce(d_scale, group=group)
        d_scale = d_scale / dist.get_world_size(group)
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(text.dtype) if need[1] else None,
            d_scale.to(ctx.scale_dtype) if need[2] else None,
            None, None, None, None,
        )


# Collectives and host-side batch sizes: eager only (module docstring).
@torch.compiler.disable
def clip_loss_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    reduction: str = "mean",
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric CLIP loss over the global batch of all ranks, from each rank's local features.

    Convention (equal to OpenCLIP's ``ClipLoss(local_loss=True, gather_with_grad=True)`` on the
    same shards). Global batch = concatenation of the ranks' batches in rank order; rank r holds
    rows ``offset_r .. offset_r + B_r - 1``. Rank r's loss is
    ``L_r = mean_{i in r} (CE_i(image_i vs all texts) + CE_i(text_i vs all images)) / 2``
    ('sum': the sum, 'none': the (B_r,) per-sample values). Backward is collective (every rank
    must call it) and gives
    - image/text features of rank r: ``d(sum_q g_q * L_q) / d(features_r)`` where g_q is rank q's
      upstream gradient: exactly OpenCLIP's gradients (they flow back through the gather), and
      with equal B_r and g_q = 1, W times the gradient of the single-process loss on the
      concatenated batch; DDP's averaging turns them into that gradient;
    - logit_scale: ``(1/W) * d(sum_q g_q * L_q) / d(scale)`` on every rank: the rank average of
      OpenCLIP's per-rank gradients, i.e. identical after DDP averages the parameter's gradient
      (the per-rank split would need a second pass over the tiles).

    Work and memory per rank: one forward pass over the (B_r x B_global) similarity tiles giving
    row LSEs locally and column-LSE partials that are combined across ranks with two O(B_global)
    all_reduces; a backward that recomputes the tiles once and returns text gradients to their owner
    ranks with a reduce-scatter. Memory O(B_global * D); the B_r x B_global matrix is never held.
    Unequal local batch sizes are supported. Works on any torch.distributed backend (NCCL, gloo).
    Not initialised: raises RuntimeError.
    """

    image_features, text_features = _checked_features(image_features, text_features, reduction, process_group)
    scale = check_scale(logit_scale, image_features.device)
    sizes = _local_batch_sizes(image_features, process_group)
    return _ClipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, reduction,
                                 backend, process_group, sizes)


class _SigLipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, reduction, backend, group, sizes):  # type: ignore[override]
        from .siglip_loss import siglip_forward_rows

        rank = dist.get_rank(group)
        offset = sum(sizes[:rank])
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        b = bias.detach().to(acc)
        text_all = all_gather_rows(text, sizes, group)
        rows = siglip_forward_rows(image, text_all, s, b, offset=offset, backend=backend)
        ctx.save_for_backward(image, text_all, s, b)
        ctx.reduction, ctx.backend, ctx.group, ctx.sizes = reduction, backend, group, sizes
        ctx.offset = offset
        ctx.param_dtypes = (scale.dtype, bias.dtype)
        if reduction == "mean":
            return rows.sum() / image.shape[0]
        return rows.sum() if reduction == "sum" else rows

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        from .siglip_loss import row_weights_for, siglip_backward

        image, text_all, s, b = ctx.saved_tensors
        weight = row_weights_for(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        d_image, d_text_all, d_scale, d_bias = siglip_backward(
            image, text_all, s, b, weight, offset=ctx.offset, backend=ctx.backend
        )
        d_text = reduce_scatter_rows(d_text_all, ctx.sizes, ctx.group)
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(image.dtype) if need[1] else None,
            d_scale.to(ctx.param_dtypes[0]) if need[2] else None,
            d_bias.to(ctx.param_dtypes[1]) if need[3] else None,
            None, None, None, None,
        )


# Collectives and host-side batch sizes: eager only (module docstring).
@torch.compiler.disable
def siglip_loss_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    reduction: str = "mean",
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SigLIP loss of each rank's images against the texts of all ranks (OpenCLIP ``SigLipLoss``).

    Convention (equal to OpenCLIP's ``SigLipLoss(rank, world_size)`` with or without
    ``bidir``, on the same shards). Global batch = concatenation of the ranks' batches in rank
    order; rank r's images are positives with their own texts only. Rank r's loss is
    ``L_r = sum_{i in r, all j} softplus(-y_ij * (s * <image_i, text_j> + b)) / B_r``
    ('sum': without the division, 'none': the (B_r,) per-image row sums). Backward is collective
    (every rank must call it) and gives
    - image features of rank r: ``g_r * dL_r / d(image_r)``;
    - text features of rank r: ``d(sum_q g_q * L_q) / d(text_r)`` (every rank's images saw them),
      returned to the owner by a reduce-scatter;
    - logit_scale, logit_bias: ``g_r * dL_r / d(.)``, rank r's own gradient, exactly as OpenCLIP.
    (g_q is rank q's upstream gradient.) These are OpenCLIP's gradients, which its ring exchange
    routes back to the owners the same way.

    Per rank: texts all-gathered (O(B_global * D)); one forward pass over the B_r x B_global tiles,
    one recomputing backward; the block itself is never held. Unequal local batch sizes are
    supported. Any torch.distributed backend (NCCL, gloo). Not initialised: raises RuntimeError.
    """

    image_features, text_features = _checked_features(image_features, text_features, reduction, process_group)
    scale = check_scale(logit_scale, image_features.device)
    bias = check_bias(logit_bias, image_features.device)
    sizes = _local_batch_sizes(image_features, process_group)
    return _SigLipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, bias,
                                   reduction, backend, process_group, sizes)
