"""The CLIP and SigLIP losses over the global batch of all ranks, from each rank's local features.

Each rank computes its local rows against the texts of every rank, one rank's piece of texts at a
time, and passes the pieces around a ring (point-to-point ``isend``/``irecv`` to the next rank, from
the previous one, as Inf-CL and siglip-kernel do) so the transfer of the next piece overlaps the
compute on the current one:

- forward: piece ``(rank - t) mod W`` at step t; row statistics merge across pieces, each piece's
  column statistics go to its columns (CLIP: combined over ranks with two O(B) all-reduces);
- backward: the gradient of text piece ``q`` travels the ring as a running sum, each rank adding its
  contribution while the next contribution is computed, and ends at its owner ``q`` after W - 1 hops
  (a reduce-scatter overlapped with compute).

O(B_global * D) memory per rank (the texts, kept from the forward); the B_r x B_global block is never
held, except the fp32 logits that the memory budget lets the CLIP loss keep (ops/_chunking.py). They
stay outside torch.compile graphs (``torch.compiler.disable``): they gather batch sizes to the host and
run collectives inside autograd Functions, which Dynamo cannot trace (it fails hard on the process
group object rather than breaking the graph). A compiled model that calls them gets a graph break
there; ``fullgraph=True`` refuses. ``clip_loss(..., distributed=True)`` and
``siglip_loss(..., distributed=True)`` (and the OpenCLIP-style modules in :mod:`llm2clip_fast.losses`)
call these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ..distributed import (
    all_gather_rows,
    check_collective_device,
    gather_batch_sizes,
    is_distributed,
    logsumexp_across_ranks,
    reduce_scatter_rows,
)
from ._chunking import record_path
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


# ---------------------------------------------------------------------------------------------
# the ring


class Ring:
    """Ranks of ``group`` on a ring: each sends to the next and receives from the previous one.

    ``sizes`` are the ranks' local batch sizes (the rows of each piece); piece p holds rows
    ``offsets[p] .. offsets[p] + sizes[p] - 1`` of the global batch.
    """

    def __init__(self, group: dist.ProcessGroup | None, sizes: list[int]) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.sizes = sizes
        self.offsets = [sum(sizes[:p]) for p in range(len(sizes))]
        to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        self._next = to_global((self.rank + 1) % self.world)
        self._prev = to_global((self.rank - 1) % self.world)

    def rows(self, p: int) -> slice:
        return slice(self.offsets[p], self.offsets[p] + self.sizes[p])

    def forward_piece(self, t: int) -> int:
        """The piece a rank works on at forward step t (its own first)."""
        return (self.rank - t) % self.world

    def backward_piece(self, t: int) -> int:
        """The piece whose gradient a rank adds to at backward step t (its own last)."""
        return (self.rank - t - 1) % self.world

    def exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list[Any]:
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous one.

        One batch (NCCL: one group), so the ring cannot deadlock on the order of sends and receives.
        The ops are torch.distributed's own isend/irecv (``P2POp`` accepts no other), also where a
        tool has wrapped the module's attributes.
        """
        ops = [dist.P2POp(c10d.isend, send, self._next, group=self.group),
               dist.P2POp(c10d.irecv, recv, self._prev, group=self.group)]
        return dist.batch_isend_irecv(ops)


def _wait(works: list[Any]) -> None:
    for w in works:
        w.wait()


def ring_over_text_pieces(ring: Ring, text: torch.Tensor,
                          compute: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """All ranks' texts (sum(sizes), D) in rank order; ``compute(p, piece)`` runs on each piece as
    it arrives, overlapped with the transfer of the next one."""
    text_all = text.new_empty((sum(ring.sizes), text.shape[1]))
    text_all[ring.rows(ring.rank)] = text
    for t in range(ring.world):
        p = ring.forward_piece(t)
        works = []
        if t + 1 < ring.world:  # pass piece p on, receive the next one
            works = ring.exchange(text_all[ring.rows(p)], text_all[ring.rows(ring.forward_piece(t + 1))])
        compute(p, text_all[ring.rows(p)])
        _wait(works)
    return text_all


def ring_reduce_scatter(ring: Ring, contribution: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """This rank's rows of ``sum over ranks of contribution(p)`` for every piece p.

    ``contribution(p)`` ((sizes[p], ...) fp32) is this rank's share of piece p's sum; each partial sum
    moves one hop per step while the next contribution is computed.
    """
    running = None
    works: list[Any] = []
    received = None
    for t in range(ring.world):
        mine = contribution(ring.backward_piece(t))
        _wait(works)
        running = mine if received is None else mine.add_(received)
        if t + 1 < ring.world:
            received = running.new_empty((ring.sizes[ring.backward_piece(t + 1)], *running.shape[1:]))
            works = ring.exchange(running, received)
        else:
            works = []
    assert running is not None
    return running


# ---------------------------------------------------------------------------------------------
# CLIP


class _ClipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, reduction, backend, group, sizes, budget):  # type: ignore[override]
        from .clip_loss import _select, plan_clip_chunks

        ring = Ring(group, sizes)
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        chosen = _select(image, text, backend)
        n_all = sum(sizes)
        plan = plan_clip_chunks(image.shape[0], n_all, image.device, image.dtype, chosen.name,
                                needs_grad=any(ctx.needs_input_grad[:3]), memory_budget_bytes=budget)
        record_path("clip_loss", plan.path)
        row_lses: list[torch.Tensor] = []
        col_lse_part = image.new_empty(n_all, dtype=acc)
        kept: dict[int, torch.Tensor] = {}

        def compute(p: int, piece: torch.Tensor) -> None:
            row_lse, col_lse, logits = chosen.run.forward(image, piece, s, plan.rows, plan.keep_logits)
            row_lses.append(row_lse)
            col_lse_part[ring.rows(p)] = col_lse
            kept[p] = logits

        text_all = ring_over_text_pieces(ring, text, compute)
        row_lse = torch.logsumexp(torch.stack(row_lses), dim=0)
        col_lse = logsumexp_across_ranks(col_lse_part, group)
        diag = torch.einsum("bd,bd->b", image.to(acc), text.to(acc))
        own = ring.rows(ring.rank)
        per_sample = 0.5 * (row_lse + col_lse[own]) - s * diag
        ctx.save_for_backward(image, text, text_all, s, row_lse, col_lse, diag,
                              *(kept[p] for p in range(ring.world)))
        ctx.reduction, ctx.impl, ctx.ring, ctx.rows = reduction, chosen.run, ring, plan.rows
        ctx.scale_dtype = scale.dtype
        if reduction == "mean":
            return per_sample.mean()
        return per_sample.sum() if reduction == "sum" else per_sample

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        image, text, text_all, s, row_lse, col_lse, diag, *kept = ctx.saved_tensors
        ring: Ring = ctx.ring
        g = _local_row_weights(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
        coef = 0.5 * g
        # Text j's term (its column LSE) belongs to the rank owning text j, with that rank's upstream
        # gradient: the column coefficients are every rank's row coefficients, gathered (O(B)).
        col_coef = all_gather_rows(coef, ring.sizes, ring.group)
        d_image = torch.zeros(image.shape, device=image.device, dtype=s.dtype)
        d_scale = torch.zeros((), device=image.device, dtype=s.dtype)

        def contribution(p: int) -> torch.Tensor:
            cols = ring.rows(p)
            col_lse_p, col_coef_p = col_lse[cols].contiguous(), col_coef[cols].contiguous()
            d_img, d_txt, d_s = ctx.impl.backward(image, text_all[cols], s, row_lse, col_lse_p, coef,
                                                  col_coef_p, kept[p], ctx.rows)
            d_image.add_(d_img)
            d_scale.add_(d_s)
            return d_txt

        d_text = ring_reduce_scatter(ring, contribution)
        gs = (g * s)[:, None]
        d_image = d_image - gs * text.to(s.dtype)
        d_text = d_text - gs * image.to(s.dtype)
        d_scale = d_scale - (g * diag).sum()
        # The blocks of all ranks together give d(sum_r L_r)/d(scale); each rank returns the rank
        # average, which is what gradient averaging (DDP) makes of OpenCLIP's per-rank values.
        dist.all_reduce(d_scale, group=ring.group)
        d_scale = d_scale / ring.world
        need = ctx.needs_input_grad
        return (
            d_image.to(image.dtype) if need[0] else None,
            d_text.to(text.dtype) if need[1] else None,
            d_scale.to(ctx.scale_dtype) if need[2] else None,
            None, None, None, None, None,
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
    memory_budget: int | str | None = None,
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

    Work and memory per rank: the texts travel a ring of point-to-point transfers that overlap the
    compute (module docstring); one pass over the (B_r x B_global) logit chunks gives row LSEs
    locally and column-LSE partials combined across ranks with two O(B_global) all_reduces; the
    backward reads the kept chunks or recomputes them (``memory_budget``, as in
    :func:`llm2clip_fast.ops.clip_loss.clip_loss`) and returns text gradients to their owners
    around the ring. Unequal local batch sizes are supported. Any torch.distributed backend with
    point-to-point operations (NCCL, gloo). Not initialised: raises RuntimeError.
    """

    image_features, text_features = _checked_features(image_features, text_features, reduction, process_group)
    scale = check_scale(logit_scale, image_features.device)
    sizes = _local_batch_sizes(image_features, process_group)
    return _ClipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, reduction,
                                 backend, process_group, sizes, memory_budget)


# ---------------------------------------------------------------------------------------------
# SigLIP


class _SigLipLossGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, reduction, backend, group, sizes, budget):  # type: ignore[override]
        from .siglip_loss import ONE_PASS, TWO_PASS, _select, plan_siglip_chunks

        ring = Ring(group, sizes)
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.detach().to(acc)
        b = bias.detach().to(acc)
        chosen = _select(image, text, backend)
        rows_per_chunk = plan_siglip_chunks(image.shape[0], sum(sizes), image.device, image.dtype,
                                            chosen.name, budget).rows
        one_pass = reduction != "none" and any(ctx.needs_input_grad[:4])
        record_path("siglip_loss", ONE_PASS if one_pass else TWO_PASS)
        own_offset = ring.offsets[ring.rank]
        rows = image.new_zeros(image.shape[0], dtype=acc)
        # One-pass: this rank's gradients of its plain row sum; the text part per piece, reduced to
        # the owners in the backward, once each rank's upstream gradient is known.
        d_image = image.new_zeros(image.shape, dtype=acc) if one_pass else None
        d_text_all = image.new_empty((sum(sizes), image.shape[1]), dtype=acc) if one_pass else None
        d_params = image.new_zeros(2, dtype=acc)

        def compute(p: int, piece: torch.Tensor) -> None:
            offset = own_offset - ring.offsets[p]  # this rank's positives are in its own piece only
            if not one_pass:
                rows.add_(chosen.run.forward(image, piece, s, b, offset, rows_per_chunk))
                return
            r, d_img, d_txt, d_s, d_b = chosen.run.fused(image, piece, s, b, offset, rows_per_chunk)
            rows.add_(r)
            d_image.add_(d_img)
            d_text_all[ring.rows(p)] = d_txt
            d_params[0] += d_s
            d_params[1] += d_b

        text_all = ring_over_text_pieces(ring, text, compute)
        if one_pass:
            ctx.save_for_backward(d_image, d_text_all, d_params)
        else:
            ctx.save_for_backward(image, text_all, s, b)
        ctx.one_pass, ctx.reduction, ctx.impl = one_pass, reduction, chosen.run
        ctx.ring, ctx.rows = ring, rows_per_chunk
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype)
        if reduction == "mean":
            return rows.sum() / image.shape[0]
        return rows.sum() if reduction == "sum" else rows

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        from .siglip_loss import row_weights_for

        ring: Ring = ctx.ring
        if ctx.one_pass:
            d_image, d_text_all, d_params = ctx.saved_tensors
            weight = row_weights_for(grad_out.to(d_image.dtype), ctx.reduction, d_image.shape[0])
            d_image, d_params = d_image * weight, d_params * weight
            d_text = reduce_scatter_rows(d_text_all * weight, ring.sizes, ring.group)
        else:
            image, text_all, s, b = ctx.saved_tensors
            weight = row_weights_for(grad_out.to(s.dtype), ctx.reduction, image.shape[0]).contiguous()
            d_image = torch.zeros(image.shape, device=image.device, dtype=s.dtype)
            d_params = torch.zeros(2, device=image.device, dtype=s.dtype)
            own_offset = ring.offsets[ring.rank]

            def contribution(p: int) -> torch.Tensor:
                offset = own_offset - ring.offsets[p]
                d_img, d_txt, d_s, d_b = ctx.impl.backward(image, text_all[ring.rows(p)], s, b, weight,
                                                           offset, ctx.rows)
                d_image.add_(d_img)
                d_params[0] += d_s
                d_params[1] += d_b
                return d_txt

            d_text = ring_reduce_scatter(ring, contribution)
        need = ctx.needs_input_grad
        dt_image, dt_text, dt_scale, dt_bias = ctx.dtypes
        return (
            d_image.to(dt_image) if need[0] else None,
            d_text.to(dt_text) if need[1] else None,
            d_params[0].to(dt_scale) if need[2] else None,
            d_params[1].to(dt_bias) if need[3] else None,
            None, None, None, None, None,
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
    memory_budget: int | str | None = None,
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

    Per rank: the texts travel a ring that overlaps the compute (module docstring). With gradients
    and 'mean' or 'sum', each piece's loss and gradients come from one pass (the one-pass path of
    :func:`llm2clip_fast.ops.siglip_loss.siglip_loss`) and the backward scales them and reduces the
    text gradients to their owners; 'none' or no gradients: a loss pass, then a recomputing backward
    whose text gradients travel the ring. The block itself is never held. Unequal local batch sizes
    are supported. Any torch.distributed backend with point-to-point operations (NCCL, gloo). Not
    initialised: raises RuntimeError.
    """

    image_features, text_features = _checked_features(image_features, text_features, reduction, process_group)
    scale = check_scale(logit_scale, image_features.device)
    bias = check_bias(logit_bias, image_features.device)
    sizes = _local_batch_sizes(image_features, process_group)
    return _SigLipLossGlobal.apply(image_features.contiguous(), text_features.contiguous(), scale, bias,
                                   reduction, backend, process_group, sizes, memory_budget)
