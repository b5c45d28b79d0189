"""Random-access loader batches: the seeded epoch layout, per-sample seeds, caption choice and the
resumable ``DataLoader`` that carries them (:func:`~.loader.build_loader` builds it; the streaming
loader, :mod:`~.stream_loader`, builds on these classes).

How an epoch is laid out (a pure function of ``len(source)``, ``seed``, ``epoch``, ``world_size``,
``batch_size``, ``drop_last`` - never of the data's content):

1. The sample indices are permuted with ``numpy.random.default_rng([seed, epoch])`` (identity order
   when ``shuffle`` is False).
2. Rank ``r`` takes every ``world_size``-th index starting at ``r``. With ``drop_last`` every rank gets
   ``len // world_size`` samples and only full batches, so all ranks run the same number of steps;
   without it every sample is used exactly once across ranks.
   So the union over ranks of their batch ``b`` is ``order[b*B*W:(b+1)*B*W]`` (``B`` the per-rank
   batch, ``W`` the world size): W ranks see the same global batches as one process with batch B*W.
3. A rank's indices are cut into batch slots of ``batch_size``; slot ``b`` is built by DataLoader worker
   ``(b - start_batch) % num_workers``. PyTorch's loader takes worker outputs round-robin, so batches
   arrive in slot order 0, 1, 2, ... whatever ``num_workers`` is.

A bad sample (missing/undecodable image, empty caption) is dropped from its slot, so a batch can be
smaller than ``batch_size``; a slot whose samples are all bad yields no batch. This keeps batch
``b``'s content independent of decoding, so resuming at ``start_batch=k`` skips k slots without
reading them and sees exactly the batches the interrupted run would have seen. Bad-sample counts ride
inside each batch from the worker to the main process and land in ``loader.bad_data``. At the end
of every epoch the bad fraction is enforced whatever the number of samples
(``BadDataTracker.check_end_of_epoch``), and the samples a truncated WebDataset shard lost past its cut
count as bad once per epoch (each rank its share).

The random crop and the caption choice of a sample are seeded by (seed, epoch, key), so they do not
depend on the rank, worker or batch the sample lands in.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .bad_data import BadDataTracker, BadSampleError
from .caption_mix import CaptionMix
from .caption_source import CaptionSource

ImageTransform = Callable[[Image.Image, random.Random], torch.Tensor]


def sample_rng(seed: int, epoch: int, key: str, purpose: str) -> random.Random:
    """A generator seeded by (seed, epoch, key, purpose): the same sample draws the same choices anywhere."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{purpose}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch (all ranks agree on it)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def rank_batches(
    n: int,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_last: bool,
) -> list[np.ndarray]:
    """The batch slots (arrays of source indices) of ``rank`` in ``epoch``; see the module docstring."""
    order = epoch_order(n, seed, epoch, shuffle)
    mine = order[rank::world_size]
    if drop_last:
        per_rank = n // world_size
        full = per_rank // batch_size
        mine = mine[: full * batch_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class CaptionBatches(IterableDataset):
    """Yields whole batches (dicts) of one rank; the loader hands them through unchanged.

    Besides the public fields each batch carries ``_seen`` (slots visited) and ``_bad`` ((key, reason)
    pairs) for the main process's :class:`BadDataTracker`.
    """

    def __init__(
        self,
        source: CaptionSource,
        *,
        batch_size: int,
        transform: ImageTransform | None,
        caption: CaptionMix | None,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start_batch: int,
        shuffle: bool,
        drop_last: bool,
    ):
        self.source = source
        self.batch_size = batch_size
        self.transform = transform
        self.caption = caption
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch
        self.shuffle = shuffle
        self.drop_last = drop_last

    def batches(self) -> list[np.ndarray]:
        if hasattr(self.source, "rank_batches"):  # a weighted mix lays out its own epoch (mixed_source)
            return self.source.rank_batches(batch_size=self.batch_size, rank=self.rank,
                                            world_size=self.world_size, seed=self.seed, epoch=self.epoch,
                                            shuffle=self.shuffle, drop_last=self.drop_last)
        return rank_batches(
            len(self.source),
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start_batch)

    def _choose_caption(self, key: str, captions: dict[str, str]) -> tuple[str, str]:
        """(name, text) of the caption ``self.caption`` draws for sample ``key`` this epoch."""
        name = self.caption.choose(sample_rng(self.seed, self.epoch, key, "caption"))
        return name, captions[name]

    def build_batch(self, batch_index: int, indices: np.ndarray) -> dict[str, Any]:
        """Load the samples of one slot; bad ones are dropped and reported in ``_bad``."""
        keys, pixels, chosen, chosen_names, all_captions, labels, bad = [], [], [], [], [], [], []
        for index in indices.tolist():
            key = self.source.key_at(index)
            try:
                captions = self.source.captions_at(index)
                if self.transform is not None:
                    rng = sample_rng(self.seed, self.epoch, key, "image")
                    if getattr(self.transform, "wants_bytes", False):  # --decode gpu: bytes and a crop box
                        pixels.append(self.transform.encode(key, self.source.image_bytes_at(index), rng))
                    else:
                        pixels.append(self.transform(self.source.image_at(index), rng))
            except BadSampleError as exc:
                bad.append((exc.key, exc.reason))
                continue
            keys.append(key)
            all_captions.append(captions)
            labels.append(self.source.label_at(index))
            if self.caption is not None:
                name, text = self._choose_caption(key, captions)
                chosen_names.append(name)
                chosen.append(text)
        batch = self.assemble(keys, pixels, chosen, chosen_names, all_captions, labels, bad, len(indices))
        batch["batch_index"] = batch_index
        return batch

    def assemble(self, keys: list[str], pixels: list[torch.Tensor], chosen: list[str],
                 chosen_names: list[str], all_captions: list[dict[str, str]], labels: list[str | None],
                 bad: list[tuple[str, str]], seen: int) -> dict[str, Any]:
        """The batch dict of the good samples of a slot of ``seen`` samples (``bad`` the dropped ones)."""
        batch: dict[str, Any] = {"keys": keys, "all_captions": all_captions}
        if self.transform is not None and pixels and isinstance(pixels[0], dict):
            # --decode gpu: undecoded JPEGs and crop boxes; the trainer decodes them on the device.
            batch["encoded_images"] = pixels
        elif self.transform is not None:
            # numpy's single-threaded copy: torch.stack's threaded copy crawls on a busy machine.
            batch["pixel_values"] = (
                torch.from_numpy(np.stack([p.numpy() for p in pixels])) if pixels else torch.empty(0)
            )
        if self.caption is not None:
            batch["captions"] = chosen
            batch["caption_names"] = chosen_names
        if self.source.label_column is not None:
            batch["labels"] = labels
        batch["_seen"] = seen
        batch["_bad"] = bad
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.batches()
        for b in range(self.start_batch, len(batches)):
            if (b - self.start_batch) % num_workers == worker:
                yield self.build_batch(b, batches[b])


class CaptionLoader(DataLoader):
    """A ``torch.utils.data.DataLoader`` of caption batches; build it with :func:`build_loader`.

    Attributes:
        bad_data: :class:`BadDataTracker` with every bad sample met so far (``loader.bad_data.summary()``).

    Call ``set_epoch(epoch)`` before each epoch (like ``DistributedSampler.set_epoch``); iterating twice
    without it repeats the same epoch. ``state_dict()`` / ``load_state_dict()`` save and restore the
    position (epoch, next batch slot, bad-data counts) for resumption.
    """

    def __init__(self, dataset: CaptionBatches, *, tracker: BadDataTracker, lost: int = 0,
                 lost_note: str = "", **kwargs: Any):
        super().__init__(dataset, batch_size=None, shuffle=False, **kwargs)
        self.bad_data = tracker
        self._next_batch = dataset.start_batch
        self._lost, self._lost_note = lost, lost_note

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def next_batch(self) -> int:
        """Slot index the next batch comes from (what ``start_batch`` must be to resume here)."""
        return self._next_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Move to ``epoch`` (new shuffle, crops, captions), skipping its first ``start_batch`` slots."""
        check_int("epoch", epoch, minimum=0)
        check_int("start_batch", start_batch, minimum=0)
        self.dataset.epoch = epoch
        self.dataset.start_batch = start_batch
        self._next_batch = start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.dataset.start_batch == 0 and self._lost:
            # Once per epoch, at its start (a run resumed mid-epoch restores counts that include them).
            self.bad_data.add_lost(self._lost, self._lost_note)
        for batch in super().__iter__():
            self.bad_data.merge(batch.pop("_seen"), batch.pop("_bad"))
            self._next_batch = batch["batch_index"] + 1
            self.bad_data.check()
            if batch["keys"]:
                yield batch
        self.bad_data.check_end_of_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start_batch": self._next_batch, "bad_data": self.bad_data.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))
        if "bad_data" in state:
            self.bad_data.load_dict(state["bad_data"])


def check_int(name: str, value: Any, minimum: int) -> None:
    """``value`` is an int (not a bool) >= ``minimum``; the ValueError names ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


