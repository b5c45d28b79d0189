"""``build_loader``: the DataLoader of caption batches for one rank, over any caption source.

It checks the layout and the caption choice, sets up the image transform and the bad-data tracker, and
returns a :class:`~.caption_batches.CaptionLoader` over random-access sources (epoch layout:
:mod:`~.caption_batches`) or a :class:`~.stream_loader.StreamLoader` over streamed shards
(:mod:`~.stream_loader`).
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .bad_data import BadDataPolicy, BadDataTracker
from .caption_batches import (
    CaptionBatches,
    CaptionLoader,
    ImageTransform,
    check_int,
    epoch_order,
    rank_batches,
    sample_rng,
)
from .caption_mix import CaptionMix
from .caption_source import CaptionSource
from .image_transforms import ClipImageTransform, clip_image_transform
from .reduced_decode import DecodeRequest
from .stream_loader import StreamBatches, StreamLoader

__all__ = ["CaptionBatches", "CaptionLoader", "ImageTransform", "build_loader", "epoch_order", "rank_batches",
           "sample_rng"]


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
        caption: which caption each sample trains on: a :class:`~.caption_mix.CaptionMix`, or its
            ``--caption`` text (``"random"``: uniform over ``source.caption_names`` per visit; one caption
            name; a weighted mix such as ``"short:0.5,long:0.5"``), or a list of names to pick among
            uniformly; None for no chosen caption (``all_captions`` still present). Checked against the
            source's captions (:meth:`~.caption_mix.CaptionMix.resolve`).
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
    caption = _caption_mix(caption, source)
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
    check_int("batch_size", batch_size, minimum=1)
    check_int("image_size", image_size, minimum=1)
    check_int("world_size", world_size, minimum=1)
    check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    check_int("num_workers", num_workers, minimum=0)
    check_int("seed", seed, minimum=0)
    check_int("epoch", epoch, minimum=0)
    check_int("start_batch", start_batch, minimum=0)


def _caption_mix(caption: str | Sequence[str] | CaptionMix | None,
                 source: CaptionSource) -> CaptionMix | None:
    """``caption`` as the :class:`CaptionMix` the batches draw from (a string parsed as ``--caption``
    is, a list as the uniform pick among its names), resolved against the source's captions."""
    if caption is None:
        return None
    if isinstance(caption, str):
        caption = CaptionMix.parse(caption, flag="caption")
    elif not isinstance(caption, CaptionMix):
        caption = CaptionMix.among(list(caption))
    return caption.resolve(source.caption_names, "the source", flag="caption")


def _check_source_can_feed(source: CaptionSource, world_size: int, shuffle_buffer: int) -> None:
    """A local source holds samples; a streamed one has a shard per rank at least."""
    if not getattr(source, "streaming", False):
        if len(source) == 0:  # also builds a lazy index here, once, rather than in every worker
            raise ValueError(f"source {source!r} holds no samples")
        return
    check_int("shuffle_buffer", shuffle_buffer, minimum=1)
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
