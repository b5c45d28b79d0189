"""Loader batches from a streaming source: whole shards per rank x worker, a seeded block shuffle.

How an epoch is laid out (a function of the shard list, ``seed``, ``epoch``, ``world_size``,
``num_workers``, ``batch_size`` and ``shuffle_buffer``; never of the data's content):

1. The shard list is permuted with ``numpy.random.default_rng([seed, epoch])`` (kept in order when
   ``shuffle`` is False). Rank ``r`` takes every ``world_size``-th shard from ``r``; its logical worker
   ``w`` takes every ``num_workers``-th of those from ``w`` (one logical worker when loading in-process).
   Every sample is read by exactly one (rank, worker) per epoch.
2. A worker reads its shards in order and cuts the stream into blocks of ``shuffle_buffer`` samples;
   each block is emitted in the order of ``default_rng([seed, epoch, rank, worker, block])`` (a seeded
   shuffle buffer whose state is empty at every block boundary, which is what makes resumption exact).
3. Consecutive emitted samples fill batch slots of ``batch_size`` (a bad sample is dropped from its slot,
   as in the random-access loader). Workers' batches arrive round-robin.

Resumption: every batch carries its worker's position: the shard, the sample number and the byte offset
where its current block starts, how many samples of that block were emitted, and whether the worker is
done. The loader's ``state_dict()`` keeps the last position of every worker and which worker comes
next; a loader given that state opens each worker's shard at the block's byte offset (seeking where the
transport can, else re-reading and discarding the bytes before it, which is logged), re-reads the block
and skips what was emitted, so it yields exactly the batches an uninterrupted run yields. A loader told
only ``start_batch=k`` (no positions) re-reads the epoch from its start and discards k batches (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
from torch.utils.data import get_worker_info

from .bad_data import BadDataTracker, BadSampleError
from .caption_batches import CaptionBatches, CaptionLoader, sample_rng
from .stream_samples import ShardError, StreamSample, iter_shard
from .stream_source import StreamingWebDatasetSource, lost_note

logger = logging.getLogger("llm2clip_fast.data.stream")


def _start() -> dict[str, Any]:
    return {"shard": 0, "sample": 0, "byte": 0, "block": 0, "emitted": 0, "batches": 0, "done": False}


def worker_shards(n_shards: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
                  workers: int) -> list[list[int]]:
    """Shard indices each logical worker of ``rank`` reads in ``epoch``, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(n_shards) if shuffle else np.arange(n_shards)
    mine = order[rank::world_size]
    return [mine[w::workers].tolist() for w in range(workers)]


class StreamBatches(CaptionBatches):
    """Yields the batches of one rank from a :class:`StreamingWebDatasetSource` (module docstring).

    Besides the public fields each batch carries ``_worker``, ``_position`` (that worker's resume
    position after it), ``_lost`` ((count, note) pairs of shards that broke) and ``_marker`` (True for
    the item closing a worker's epoch, which holds no samples).
    """

    def __init__(self, source: StreamingWebDatasetSource, *, workers: int, shuffle_buffer: int,
                 **kwargs: Any):
        super().__init__(source, start_batch=0, **kwargs)
        self.workers = workers
        self.shuffle_buffer = shuffle_buffer
        self.positions: dict[int, dict[str, Any]] = {}  # logical worker -> position to resume from
        self.rotation = 0  # logical worker of DataLoader worker 0 (the one whose batch comes next)

    def plan(self) -> list[list[int]]:
        return worker_shards(len(self.source.shards), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                             rank=self.rank, world_size=self.world_size, workers=self.workers)

    def batches(self) -> list[np.ndarray]:
        raise TypeError("a streaming loader has no precomputed batch slots")

    def __len__(self) -> int:
        raise TypeError("a streaming loader has no length in advance (StreamLoader.num_batches counts it)")

    def full_batches(self, rank: int) -> int:
        """Full batches ``rank`` yields in this epoch from the shards' nominal sample counts."""
        sizes = self.source.shard_sizes
        plan = worker_shards(len(sizes), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, rank=rank,
                             world_size=self.world_size, workers=self.workers)
        return sum(sum(sizes[s] for s in shards) // self.batch_size for shards in plan)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.workers:
            raise RuntimeError(f"the stream was laid out for {self.workers} workers, the loader has "
                               f"{num_workers}")
        yield from self.worker_batches((worker + self.rotation) % num_workers)

    def _samples(self, shards: list[int], pos: dict[str, Any], lost: list[tuple[int, str]],
                 ) -> Iterator[tuple[int, StreamSample]]:
        """(position in ``shards``, sample) from ``pos`` on; a shard that breaks goes into ``lost``."""
        for k in range(pos["shard"], len(shards)):
            shard = shards[k]
            first = pos["sample"] if k == pos["shard"] else 0
            try:
                for sample in iter_shard(self.source.shards[shard], shard, start_number=first,
                                         start_offset=pos["byte"] if k == pos["shard"] else 0,
                                         policy=self.source.transport):
                    yield k, sample
            except ShardError as exc:
                lost.append((self.source.lost_after(shard, first + exc.samples_read), lost_note(exc)))

    def worker_batches(self, worker: int) -> Iterator[dict[str, Any]]:
        """The batches of logical ``worker`` from its saved position (the epoch start by default)."""
        pos = dict(self.positions.get(worker) or _start())
        if pos["done"]:
            return
        lost: list[tuple[int, str]] = []
        stream = self._samples(self.plan()[worker], pos, lost)
        size = self.shuffle_buffer if self.shuffle and self.shuffle_buffer > 1 else 1
        block_no, skip, made, pending = pos["block"], pos["emitted"], pos["batches"], []
        while block := list(islice(stream, size)):
            if skip:  # a resumed block: what broke while reading it went out with the batch that saved pos
                lost.clear()
            k, head = block[0]
            start = {"shard": k, "sample": head.number, "byte": head.offset}
            order = (np.random.default_rng([self.seed, self.epoch, self.rank, worker, block_no])
                     .permutation(len(block)).tolist() if size > 1 else [0])
            for emitted in range(skip + 1, len(block) + 1):
                pending.append(block[order[emitted - 1]][1])
                if len(pending) == self.batch_size:
                    made += 1
                    position = {**start, "block": block_no, "emitted": emitted, "batches": made,
                                "done": False}
                    yield self._stream_batch(pending, worker, position, lost)
                    pending = []
                    lost.clear()  # the reader appends to this very list
            block_no, skip = block_no + 1, 0
        if pending and not self.drop_last:
            made += 1
        else:
            pending = []
        done = {**_start(), "batches": made, "done": True}
        yield self._stream_batch(pending, worker, done, lost, marker=not pending)

    def _stream_batch(self, samples: list[StreamSample], worker: int, position: dict[str, Any],
                      lost: list[tuple[int, str]], marker: bool = False) -> dict[str, Any]:
        keys, pixels, chosen, chosen_names, all_captions, labels, bad = [], [], [], [], [], [], []
        for sample in samples:
            try:
                captions, label = self.source.captions_of(sample)
                if self.transform is not None:
                    image = self.source.image_of(sample)
                    rng = sample_rng(self.seed, self.epoch, sample.key, "image")
                    pixels.append(self.transform(image, rng))
            except BadSampleError as exc:
                bad.append((exc.key, exc.reason))
                continue
            keys.append(sample.key)
            all_captions.append(captions)
            labels.append(label)
            if self.caption is not None:
                name, text = self._choose_caption(sample.key, captions)
                chosen_names.append(name)
                chosen.append(text)
        batch = self.assemble(keys, pixels, chosen, chosen_names, all_captions, labels, bad, len(samples))
        batch.update({"_worker": worker, "_position": position, "_lost": list(lost), "_marker": marker})
        return batch


class StreamLoader(CaptionLoader):
    """A :class:`CaptionLoader` over a streaming source; build it with :func:`~.loader.build_loader`.

    ``state_dict()`` adds ``stream``: the layout it was made for (workers, rank, world size, shard
    count, shuffle buffer) and each worker's position; ``load_state_dict`` restores it exactly (the
    layout must match: streaming batches depend on how shards are split over workers).
    ``num_batches()`` is the epoch's batch count from the shards' sample counts (a counting pass on
    first use).
    """

    def __init__(self, dataset: StreamBatches, *, tracker: BadDataTracker, **kwargs: Any):
        super().__init__(dataset, tracker=tracker, **kwargs)
        self._positions: dict[int, dict[str, Any]] = {}
        self._next_worker = 0
        # (epoch, start_batch, positions, next worker) from load_state_dict, until iteration starts.
        self._restored: tuple[int, int, dict[int, dict[str, Any]], int] | None = None
        # Where an iteration starts: (positions, next worker, next batch, batches to re-read and discard).
        self._origin: tuple[dict[int, dict[str, Any]], int, int, int] = ({}, 0, 0, 0)

    def num_batches(self) -> int:
        """Batches this rank yields in the current epoch (equal over ranks with ``drop_last``)."""
        data: StreamBatches = self.dataset
        if data.drop_last:
            return min(data.full_batches(r) for r in range(data.world_size))
        sizes, total = data.source.shard_sizes, 0
        for shards in data.plan():
            total += -(-sum(sizes[s] for s in shards) // data.batch_size)
        return total

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Move to ``epoch``; ``start_batch=k`` resumes after k batches (exactly, from saved positions
        when :meth:`load_state_dict` gave them for this point, else by re-reading and discarding)."""
        super().set_epoch(epoch, start_batch)
        self.dataset.start_batch = 0
        if self._restored is not None and self._restored[:2] == (epoch, start_batch):
            positions, next_worker = self._restored[2:]
            self._origin = (dict(positions), next_worker, start_batch, 0)
        else:
            self._origin = ({}, 0, start_batch, start_batch)

    def _limit(self) -> int | None:
        return self.num_batches() if self.dataset.drop_last else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Every iteration starts where set_epoch / load_state_dict put the epoch (iterating twice
        # without set_epoch repeats it, as the random-access loader does).
        self._restored = None  # saved positions serve set_epoch calls up to the first iteration
        positions, self._next_worker, self._next_batch, discard = self._origin
        self._positions = dict(positions)
        data: StreamBatches = self.dataset
        data.positions, data.rotation = dict(positions), self._next_worker
        if discard:
            logger.warning("stream: resuming epoch %d at batch %d without saved stream positions: re-reading "
                           "the epoch from its start and discarding %d batches", data.epoch, self._next_batch,
                           discard)
        limit = self._limit()
        count = self._next_batch - discard
        for batch in super(CaptionLoader, self).__iter__():
            worker, position = batch.pop("_worker"), batch.pop("_position")
            lost, marker = batch.pop("_lost"), batch.pop("_marker")
            seen, bad = batch.pop("_seen"), batch.pop("_bad")
            if not marker and limit is not None and count >= limit:
                break  # drop_last: every rank stops after the same number of batches
            self._positions[worker], self._next_worker = position, (worker + 1) % data.workers
            if discard:  # already counted by the run being resumed
                if not marker:
                    discard, count = discard - 1, count + 1
                continue
            for n, note in lost:
                self.bad_data.add_lost(n, note)
            self.bad_data.check()
            if marker:
                continue
            self.bad_data.merge(seen, bad)
            self.bad_data.check()
            batch["batch_index"] = count
            count += 1
            self._next_batch = count
            if batch["keys"]:
                yield batch
        self.bad_data.check_end_of_epoch()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["stream"] = {"layout": self._layout(), "positions": {int(w): dict(p) for w, p in
                                                                   self._positions.items()},
                           "next_worker": self._next_worker}
        return state

    def _layout(self) -> dict[str, int]:
        data: StreamBatches = self.dataset
        return {"workers": data.workers, "rank": data.rank, "world_size": data.world_size,
                "shards": len(data.source.shards), "shuffle_buffer": data.shuffle_buffer,
                "batch_size": data.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; a state without ``stream`` (a random-access loader's)
        resumes by re-reading and discarding."""
        stream = state.get("stream")
        if stream is not None:
            saved, now = stream["layout"], self._layout()
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            if diff:
                names = {"workers": "num_workers"}
                changes = ", ".join(f"{names.get(k, k)} was {a}, is {b}" for k, (a, b) in diff.items())
                raise ValueError("the saved stream state does not fit this loader (streamed batches depend "
                                 f"on how shards are split): {changes}")
        if stream is not None:
            positions = {int(w): dict(p) for w, p in stream["positions"].items()}
            self._restored = (int(state["epoch"]), int(state["start_batch"]), positions,
                              int(stream["next_worker"]))
        super().load_state_dict(state)  # set_epoch: from the positions above, else by re-reading
