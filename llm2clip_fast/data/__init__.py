"""Data: caption sources, image preprocessing, loaders, the built-in demo set, the embedding cache.

Public API (stable; other parts of the library build on it):

``open_source(spec, *, image_column="image", caption_columns=None, key_column="key",
label_column="label", bad_data=None) -> CaptionSource``
    ``spec`` is a manifest (``.csv``/``.tsv``/``.jsonl``; relative image paths resolve against its
    folder) or WebDataset shards (brace pattern "d/{000..009}.tar", glob, "::"-joined, or a list).
    Shard URLs (``pipe:CMD``, ``http(s)://``, ``s3://``/``gs://``/... through fsspec) open a
    :class:`~.stream_source.StreamingWebDatasetSource` read in order (``streaming=True`` streams local
    tars too; ``transport=TransportPolicy(timeout, retries)`` bounds each shard read).
    A folder stands for its single manifest or its ``*.tar`` shards (the demo's layout).
    ``caption_columns=None`` takes every caption found. Structural mistakes raise ValueError listing
    what exists (columns found, patterns tried, folder contents). A truncated shard keeps the samples
    before the cut; it is warned about and noted in the bad-data report.

``CaptionSource``
    ``.caption_names`` list[str]; ``len(source)``; ``.keys()``; ``.labels()`` -> {key: label} (the
    ``label`` field, for zero-shot evaluation; ``.label_column`` is None without one);
    ``.iter_captions()`` -> (key, {name: text}) without decoding images; ``.iter_records()`` ->
    :class:`Record` with RGB images; ``.record_at(i)`` / ``.captions_at(i)`` / ``.key_at(i)`` random
    access. Bad samples are skipped and counted in ``source.bad_data`` (or the tracker passed).

``Record(key, image, captions, label=None)``

``build_loader(source, *, batch_size, image_size=224, train=True, caption="random", with_images=True,
rank=0, world_size=1, num_workers=0, seed=0, epoch=0, start_batch=0, drop_last=False, bad_data=None,
...) -> CaptionLoader`` (a ``torch.utils.data.DataLoader``)
    ``caption`` is a :class:`~.caption_mix.CaptionMix` or its ``--caption`` text (a caption name,
    ``"random"``, a weighted mix ``"short:0.5,long:0.5"``), a list of names to pick among uniformly, or
    None; ``CaptionMix.parse(text)`` reads the flag once, ``.resolve(names)`` checks it against data.
    Batches are dicts: ``keys`` list[str]; ``pixel_values`` float32 (B, 3, S, S) when
    ``with_images``; ``captions`` / ``caption_names`` list[str] (the chosen caption and its name per
    sample) when ``caption`` is not None; ``all_captions`` list[dict[str, str]]; ``labels``
    list[str | None] when the source has labels; ``batch_index`` int.
    Every sample appears exactly once per epoch across ranks x workers (``drop_last=False``); the
    shuffle is seeded by (seed, epoch), crops and caption choices by (seed, epoch, key).
    ``loader.set_epoch(epoch, start_batch=0)`` moves to the next epoch (call it each epoch);
    ``start_batch=k`` (or ``loader.state_dict()`` / ``load_state_dict()``) resumes an epoch after its
    first k batch slots, reproducing exactly the batches an uninterrupted run would see. Bad samples
    shrink their batch (a batch can hold fewer than ``batch_size``); ``loader.bad_data.summary()``
    reports them, and :class:`BadDataError` stops the run past ``BadDataPolicy.max_fraction`` (default
    1%) once ``min_samples`` (default 100) samples were seen.

Streaming sources get a :class:`~.stream_loader.StreamLoader` from ``build_loader``: whole shards per
rank x worker, a seeded shuffle buffer of ``shuffle_buffer`` samples, ``state_dict()`` holding each
worker's shard, sample and byte offset for an exact resume (see :mod:`~.stream_loader`).

``clip_image_transform(size=224, train=False, *, scale=(0.9, 1.0), ...)``
    PIL image -> normalised float32 (3, size, size), CLIP mean/std, no torchvision.

``llm2clip_fast.data.demo``: the built-in procedurally drawn demo set. ``write_demo(out_dir, n_train,
n_val, n_long_detail_groups, format="manifest"|"wds", seed, image_size) -> {split: spec}`` and
``python -m llm2clip_fast.data.demo --out DIR --n N --format manifest|wds``. Captions ``short`` and
``long``; label field ``label`` ("<colour> <shape>" of the dominant object, ``demo.CLASSES``); the
``long_detail`` split's groups (``demo.long_detail_groups(keys)``) share their first 80+ words.
"""

from __future__ import annotations

from .bad_data import BadDataError, BadDataPolicy, BadDataTracker, BadSampleError
from .caption_source import CaptionSource
from .image_transforms import CLIP_MEAN, CLIP_STD, ClipImageTransform, clip_image_transform
from .loader import CaptionLoader, build_loader
from .manifest import ManifestSource
from .records import Record
from .sources import open_source
from .stream_transport import TransportError, TransportPolicy

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "BadDataError",
    "BadDataPolicy",
    "BadDataTracker",
    "BadSampleError",
    "CaptionLoader",
    "CaptionSource",
    "ClipImageTransform",
    "ManifestSource",
    "Record",
    "TransportError",
    "TransportPolicy",
    "build_loader",
    "clip_image_transform",
    "open_source",
]
