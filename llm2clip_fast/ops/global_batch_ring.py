"""The ring of ranks the global-batch CLIP and SigLIP losses pass text pieces around, and the checks
both run before any collective.

The losses over the global batch of all ranks (``clip_loss_global`` in :mod:`llm2clip_fast.ops.clip_loss`,
``siglip_loss_global`` in :mod:`llm2clip_fast.ops.siglip_loss`) compute each rank's local rows against
the texts of every rank, one rank's piece of texts at a time, and pass the pieces around a ring
(point-to-point ``isend``/``irecv`` to the next rank, from the previous one, as Inf-CL and siglip-kernel
do) so the transfer of the next piece overlaps the compute on the current one:

- forward: piece ``(rank - t) mod W`` at step t; row statistics merge across pieces, each piece's
  column statistics go to its columns (CLIP: combined over ranks with two O(B) all-reduces);
- backward: the gradient of text piece ``q`` travels the ring as a running sum, each rank adding its
  contribution while the next contribution is computed, and ends at its owner ``q`` after W - 1 hops
  (a reduce-scatter overlapped with compute).

O(B_global * D) memory per rank (the texts, kept from the forward); the B_r x B_global block is never
held, except the fp32 logits that the memory budget lets the CLIP loss keep (ops/_chunking.py). The
global losses stay outside torch.compile graphs (``torch.compiler.disable``): they gather batch sizes
to the host and run collectives inside autograd Functions, which Dynamo cannot trace (it fails hard on
the process group object rather than breaking the graph). A compiled model that calls them gets a
graph break there; ``fullgraph=True`` refuses. ``clip_loss(..., distributed=True)`` and
``siglip_loss(..., distributed=True)`` (and the OpenCLIP-style modules in :mod:`llm2clip_fast.losses`)
call them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ..distributed import check_collective_device, gather_batch_sizes, is_distributed
from .loss_inputs import check_pair


def _require_process_group() -> None:
    if not is_distributed():
        raise RuntimeError(
            "a distributed loss was requested (distributed=True or a process_group) but torch.distributed "
            "is not initialised; call init_distributed_from_env() first (or drop distributed=True)"
        )


def checked_features(image: torch.Tensor, text: torch.Tensor, reduction: str,
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


def local_batch_sizes(image: torch.Tensor, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's local batch size (a collective); an empty rank is an error on every rank."""
    sizes = gather_batch_sizes(image.shape[0], image.device, group)
    if min(sizes) == 0:
        raise ValueError(f"every rank needs a non-empty local batch; local batch sizes are {sizes}")
    return sizes


def local_row_weights(grad_out: torch.Tensor, reduction: str, m: int) -> torch.Tensor:
    """Per-row upstream gradient of a reduced loss, as an (m,) vector."""
    if reduction == "mean":
        return (grad_out.reshape(()) / m).expand(m)
    if reduction == "sum":
        return grad_out.reshape(()).expand(m)
    return grad_out


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
