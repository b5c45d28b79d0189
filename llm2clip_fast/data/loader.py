"""DataLoader over a caption source: deterministic rank/worker sharding, seeded shuffle, caption choice.

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
import os
import random
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .bad_data import BadDataPolicy, BadDataTracker, BadSampleError
from .caption_mix import CaptionMix, check_mix_names
from .caption_source import CaptionSource
from .image_transforms import ClipImageTransform, clip_image_transform
from .reduced_decode import DecodeRequest

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
        caption: str | list[str] | CaptionMix | None,
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
        if isinstance(self.caption, str) and self.caption != "random":
            return self.caption, captions[self.caption]
        if isinstance(self.caption, CaptionMix):
            name = self.caption.choose(sample_rng(self.seed, self.epoch, key, "caption"))
            return name, captions[name]
        names = self.source.caption_names if self.caption == "random" else self.caption
        name = sample_rng(self.seed, self.epoch, key, "caption").choice(names)
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
        _check_int("epoch", epoch, minimum=0)
        _check_int("start_batch", start_batch, minimum=0)
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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def build_loader(
    source: CaptionSource | str | os.PathLike,
    *,
    batch_size: int,
    image_size: int = 224,
    train: bool = True,
    caption: str | Sequence[str] | CaptionMix | None = "random",
    with_images: bool = True,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    shuffle: bool | None = None,
    drop_last: bool = False,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    transform: ImageTransform | None = None,
    bad_data: BadDataPolicy | float | BadDataTracker | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | None = None,
    shuffle_buffer: int = 1000,
    decode: str = "exact",
) -> CaptionLoader:
    """A DataLoader of caption batches for one rank (see the module docstring for the epoch layout).

    Args:
        source: a :class:`CaptionSource` or a spec for :func:`~.sources.open_source`.
        batch_size: samples per batch slot (bad samples make a batch smaller).
        image_size: side S of ``pixel_values`` (3, S, S).
        train: random resized crop (``crop_scale``) instead of centre crop; also the default ``shuffle``.
        caption: "random" (uniform over ``source.caption_names`` per visit), one caption name, a list of
            names to choose among uniformly, a :class:`~.caption_mix.CaptionMix` (names drawn by weight,
            e.g. ``parse_caption_spec("short:0.5,long:0.5")``), or None (no chosen caption;
            ``all_captions`` still present).
        with_images: decode images into ``pixel_values``; False gives caption-only batches (fast).
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: DataLoader worker processes (0 = load in this process).
        seed, epoch: the shuffle, crops and caption choices are functions of (seed, epoch, key).
        start_batch: skip this many batch slots of the epoch (resumption), without reading them.
        shuffle: defaults to ``train``.
        drop_last: equal, full batches on every rank (some samples unused each epoch).
        transform: ``(PIL image, random.Random) -> (3, S, S)`` tensor replacing the CLIP transform.
        bad_data: policy (or max fraction, or a tracker to share) for bad samples.
        pin_memory, prefetch_factor, multiprocessing_context: passed to the DataLoader. Workers are
            started afresh each epoch (no ``persistent_workers``) so they see ``set_epoch``.
        decode: how training images are decoded: "exact" (full-size PIL decode; the default), "reduced"
            (JPEGs decoded at 1/2, 1/4 or 1/8 size where every possible crop keeps the output size:
            :mod:`.reduced_decode`; training only, pixels differ slightly), "gpu" (workers ship JPEG bytes
            and crop boxes in ``encoded_images``, the trainer decodes on the GPU: :mod:`.gpu_decode`;
            needs a uint8 training ClipImageTransform and a source that serves bytes).
        shuffle_buffer: streaming sources only (``source.streaming``, e.g. http/pipe:/s3 shards): samples
            per seeded shuffle block. Such sources get a :class:`~.stream_loader.StreamLoader`: whole
            shards per rank x worker (at least ``world_size`` shards needed), batches that depend on
            ``num_workers``, exact resumption from ``state_dict()`` (see :mod:`~.stream_loader`).

    Returns:
        :class:`CaptionLoader` yielding dicts: ``keys`` list[str]; ``pixel_values`` float32 (B, 3, S, S)
        (with images; uint8 unnormalised from a transform with ``output="uint8"``; with ``decode="gpu"``
        ``encoded_images`` instead, see :func:`~.gpu_decode.decode_batch`); ``captions`` list[str] and
        ``caption_names`` list[str] (the chosen caption and its name per sample, when ``caption`` is not
        None); ``all_captions`` list[dict[str, str]];
        ``labels`` list[str | None] (when the source has a label column); ``batch_index`` int (the slot).
    """
    source = _as_source(source)
    _check_layout(batch_size=batch_size, image_size=image_size, world_size=world_size, rank=rank,
                  num_workers=num_workers, seed=seed, epoch=epoch, start_batch=start_batch)
    caption = _checked_caption(caption, source)
    streaming = getattr(source, "streaming", False)
    _check_source_can_feed(source, world_size, shuffle_buffer)
    if with_images:
        transform = _image_transform(source, transform, image_size, train, crop_scale, decode)
    tracker = bad_data if isinstance(bad_data, BadDataTracker) else BadDataTracker(bad_data)
    if not streaming:  # a stream notes each broken shard when it reads it (with what it lost)
        for problem in getattr(source, "damaged_shards", {}).values():
            tracker.add_note(problem)
    common = dict(batch_size=batch_size, transform=transform if with_images else None, caption=caption,
                  rank=rank, world_size=world_size, seed=seed, epoch=epoch,
                  shuffle=train if shuffle is None else shuffle, drop_last=drop_last)
    kwargs = _dataloader_kwargs(tracker, num_workers=num_workers, seed=seed, pin_memory=pin_memory,
                                prefetch_factor=prefetch_factor,
                                multiprocessing_context=multiprocessing_context)
    if streaming:
        return _stream_loader(source, common, kwargs, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                              epoch=epoch, start_batch=start_batch)
    lost, lost_note = _lost_share(source, rank, world_size)
    dataset = CaptionBatches(source, start_batch=start_batch, **common)
    return CaptionLoader(dataset, lost=lost, lost_note=lost_note, **kwargs)


def _as_source(source: CaptionSource | str | os.PathLike) -> CaptionSource:
    """``source`` itself, or the source a spec names (:func:`~.sources.open_source`)."""
    from .sources import open_source

    if isinstance(source, CaptionSource):
        return source
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        raise TypeError(f"source must be a CaptionSource or a source spec, got {type(source).__name__}")
    return open_source(source)


def _check_layout(*, batch_size: int, image_size: int, world_size: int, rank: int, num_workers: int,
                  seed: int, epoch: int, start_batch: int) -> None:
    """The integers that lay out an epoch are ints in range; errors name the argument."""
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("image_size", image_size, minimum=1)
    _check_int("world_size", world_size, minimum=1)
    _check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    _check_int("num_workers", num_workers, minimum=0)
    _check_int("seed", seed, minimum=0)
    _check_int("epoch", epoch, minimum=0)
    _check_int("start_batch", start_batch, minimum=0)


def _checked_caption(caption: str | Sequence[str] | CaptionMix | None,
                     source: CaptionSource) -> str | list[str] | CaptionMix | None:
    """The caption choice, a sequence made a list, every name it may pick checked against the source."""
    if isinstance(caption, CaptionMix):
        check_mix_names(caption, source.caption_names, "the source", flag="caption")
    elif caption is not None and not isinstance(caption, str):
        caption = list(caption)
        if not caption:
            raise ValueError("caption as a list must name at least one caption")
    names = [caption] if isinstance(caption, str) and caption != "random" else caption
    if isinstance(names, list):
        unknown = [n for n in names if n not in source.caption_names]
        if unknown:
            raise ValueError(
                f"caption {unknown} not among the source's captions {source.caption_names} "
                "(or use 'random' or None)"
            )
    return caption


def _check_source_can_feed(source: CaptionSource, world_size: int, shuffle_buffer: int) -> None:
    """A local source holds samples; a streamed one has a shard per rank at least."""
    if not getattr(source, "streaming", False):
        if len(source) == 0:  # also builds a lazy index here, once, rather than in every worker
            raise ValueError(f"source {source!r} holds no samples")
        return
    _check_int("shuffle_buffer", shuffle_buffer, minimum=1)
    if len(source.shards) < world_size:
        raise ValueError(f"a streaming source is split by whole shards over ranks: its "
                         f"{len(source.shards)} shard(s) cannot feed world_size={world_size} ranks; "
                         "write more, smaller shards")


DECODES = ("exact", "reduced", "gpu")


def _image_transform(source: CaptionSource, transform: ImageTransform | None, image_size: int, train: bool,
                     crop_scale: tuple[float, float], decode: str = "exact") -> ImageTransform:
    """``transform``, or the CLIP transform of ``image_size``; a CLIP-style transform also lets the
    source decode large images smaller, and ``decode`` (see :func:`build_loader`) chooses how."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if transform is None:
        transform = clip_image_transform(image_size, train=train, scale=crop_scale)
    if decode != "exact" and not (isinstance(transform, ClipImageTransform) and transform.train):
        raise ValueError(f"decode={decode!r} is for training crops of a ClipImageTransform (train=True); "
                         "evaluation and custom transforms decode exactly")
    if isinstance(transform, ClipImageTransform):
        # The CLIP-style transforms never need more than ~their resize side in pixels: large images may
        # decode smaller (bounded memory for a 9000x9000 photo). A custom transform gets full-size images.
        side = max(transform.size, transform.resize_size or 0)
        current = source.decode_min_side
        current = current.min_side if isinstance(current, DecodeRequest) else current
        side = max(side, current or 0)
        if decode == "reduced":
            source.set_decode_min_side(DecodeRequest(side, transform.reduced_decode()))
        else:
            source.set_decode_min_side(side)
    if decode == "gpu":
        from .gpu_decode import JpegCropTransform

        if not source.serves_image_bytes:
            raise ValueError(f"decode='gpu' needs undecoded image bytes, which {type(source).__name__} does "
                             "not hand out (local manifests and WebDataset shards do); use exact or reduced")
        if transform.output != "uint8":
            raise ValueError("decode='gpu' needs a uint8 transform: clip_image_transform(output='uint8')")
        return JpegCropTransform(transform)
    return transform


def _lost_share(source: CaptionSource, rank: int, world_size: int) -> tuple[int, str]:
    """This rank's share of the samples truncated shards lost (counted as bad once per epoch), and
    the note that says so."""
    lost_total = sum(getattr(source, "lost_samples", {}).values())
    lost = lost_total // world_size + (1 if rank < lost_total % world_size else 0)
    note = (f"{lost_total} sample(s) lost in truncated shards counted as bad each epoch"
            f"{f' ({lost} on this rank)' if world_size > 1 else ''}")
    return lost, note


def ignore_sigterm_in_worker(worker_id: int) -> None:
    """A loader worker ignores SIGTERM: its trainer stops at a step boundary and saves when SLURM sends
    SIGTERM to every process of a job (see ``train.stop_requests``), and shuts its workers down itself.
    A worker killed by the signal would break that step with "DataLoader worker exited unexpectedly"
    (and one that inherited the trainer's handler would raise in the worker)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _dataloader_kwargs(tracker: BadDataTracker, *, num_workers: int, seed: int, pin_memory: bool,
                       prefetch_factor: int | None, multiprocessing_context: str | None) -> dict[str, Any]:
    """The keyword arguments of the loader classes: tracker, workers, pinning and the worker-seed
    generator (the worker-only options only with workers)."""
    extra: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        extra["prefetch_factor"] = prefetch_factor
    if num_workers > 0 and multiprocessing_context is not None:
        extra["multiprocessing_context"] = multiprocessing_context
    if num_workers > 0:
        extra["worker_init_fn"] = ignore_sigterm_in_worker
    # DataLoader draws its workers' base seed each epoch from this generator, or from the global torch
    # RNG when it has none: a private one keeps the trainer's dropout stream independent of where a
    # resumed run re-enters the epoch (the batches themselves are seeded per sample, not from it).
    generator = torch.Generator().manual_seed(seed)
    return dict(tracker=tracker, num_workers=num_workers, pin_memory=pin_memory, generator=generator, **extra)


def _stream_loader(source: CaptionSource, common: dict[str, Any], kwargs: dict[str, Any], *, num_workers: int,
                   shuffle_buffer: int, epoch: int, start_batch: int) -> CaptionLoader:
    """The :class:`~.stream_loader.StreamLoader` of a streamed source: whole shards per rank x worker."""
    from .stream_loader import StreamBatches, StreamLoader

    workers = max(1, num_workers)
    world_size = common["world_size"]
    if len(source.shards) < world_size * workers:
        warnings.warn(f"{len(source.shards)} shards over {world_size} rank(s) x {workers} worker(s): "
                      "some workers get no shard and stay idle", stacklevel=3)
    loader = StreamLoader(StreamBatches(source, workers=workers, shuffle_buffer=shuffle_buffer, **common),
                          **kwargs)
    if start_batch:
        loader.set_epoch(epoch, start_batch)
    return loader
