"""Refuse an output folder that the ranks of a distributed run do not share.

``embed`` under ``torchrun --nnodes N`` has every rank write its own cache shards into ``--out`` and
rank 0 merge them into the manifest: that only works when ``--out`` is one shared filesystem (NFS,
Lustre, a mounted bucket) at the same path on every node. A node-local path would leave rank 0
waiting for shards it can never see. :func:`check_shared_folder` finds out before any work: each rank
writes a marker file (its rank and host, tagged with a token of this run) into the folder, and after
a barrier rank 0 lists the markers it sees; every rank then raises the same error if one is missing.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

from .. import distributed

MARKER_DIR = ".rank-markers"


class UnsharedFolderError(RuntimeError):
    """Some ranks of a distributed run write to a folder that rank 0 cannot see."""


def check_shared_folder(folder: str | os.PathLike, *, what: str = "--out") -> None:
    """Raise :class:`UnsharedFolderError` on every rank unless all ranks see the same ``folder``
    (created if absent). A no-op without a process group. A collective: every rank must call it."""
    if not distributed.is_distributed():
        return
    import torch.distributed as dist

    rank, world = distributed.get_rank(), distributed.get_world_size()
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    markers = Path(folder) / MARKER_DIR
    markers.mkdir(parents=True, exist_ok=True)
    mine = markers / f"{token[0]}-rank{rank:05d}.json"
    mine.write_text(json.dumps({"rank": rank, "host": hosts[rank], "token": token[0]}))
    distributed.barrier()
    verdict: list[list[int] | None] = [None]
    if rank == 0:
        seen = set()
        for path in markers.glob(f"{token[0]}-rank*.json"):
            try:
                seen.add(int(json.loads(path.read_text())["rank"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: counts as unseen
        verdict = [[r for r in range(world) if r not in seen]]
    dist.broadcast_object_list(verdict, src=0)
    mine.unlink(missing_ok=True)
    distributed.barrier()
    if rank == 0:
        try:
            markers.rmdir()
        except OSError:
            pass  # markers of an older, killed run remain: harmless
    missing = verdict[0] or []
    if missing:
        where = ", ".join(f"rank {r} on {hosts[r]}" for r in missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UnsharedFolderError(
            f"{what} {folder} is not shared by every rank: rank 0 on {hosts[0]} cannot see what {where} "
            "wrote there. Each rank writes its shards into this folder and rank 0 merges them, so on "
            "several nodes it must be a shared filesystem (NFS, Lustre, a mounted bucket) at the same "
            "path on every node")
