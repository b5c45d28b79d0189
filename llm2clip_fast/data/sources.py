"""``open_source``: one entry point for every caption-source format."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .bad_data import BadDataPolicy
from .caption_source import CaptionSource
from .manifest import MANIFEST_SUFFIXES, ManifestSource
from .stream_transport import TransportPolicy, is_stream_url

SourceSpec = str | os.PathLike | Sequence[str | os.PathLike]


def open_source(
    spec: SourceSpec,
    *,
    image_column: str = "image",
    caption_columns: str | Sequence[str] | None = None,
    key_column: str | None = "key",
    label_column: str | None = "label",
    bad_data: BadDataPolicy | float | None = None,
    image_root_only: bool = False,
    require_images: bool = True,
    streaming: bool | None = None,
    transport: TransportPolicy | None = None,
    mix_weights: str | Sequence[float] | None = None,
    resampled: bool = False,
) -> CaptionSource:
    """Open a caption source and check its structure.

    Args:
        spec: a manifest path (``.csv``, ``.tsv``, ``.jsonl``) or a WebDataset shard spec: a brace
            pattern ("data/{000..009}.tar"), a glob ("data/*.tar"), several joined by "::", or a list;
            shards may be URLs ("https://host/d-{000..099}.tar", "pipe:cat d/{0..9}.tar", "s3://...").
            A folder stands for the single manifest in it, else for all its ``*.tar`` shards (the
            layout :func:`~.demo.write_demo` produces).
        image_column: manifest column with the image path (relative paths resolve against the
            manifest's folder). WebDataset samples use their image member (jpg/jpeg/png/webp).
        caption_columns: caption names to use; None = every caption found (manifest: all columns but
            key/image/label; WebDataset: every string field of the JSON but key/label/image-ish fields,
            or "caption" for a .txt member).
        key_column: manifest column with the sample key (absent: the image path is the key).
            WebDataset keys are always the tar member prefix (``__key__``).
        label_column: field with a class label for zero-shot evaluation; never a caption. Used when
            present, ignored when absent (``source.label_column`` is then None).
        bad_data: policy for ``iter_captions`` / ``iter_records`` (``source.bad_data`` tracks them).
        image_root_only: manifests only: an image path leading outside the manifest's folder (``..``,
            absolute paths, symlinks out) makes its sample bad instead of being read.
        require_images: False accepts a manifest without an image column (text-only sources for
            stage 1 and embed, which read captions only; keys come from the key column, else the row
            number). WebDataset shards are read for captions without touching their images either way.
        streaming: how WebDataset shards are read. None (default): as streams when the spec names a
            ``pipe:`` command or a ``PROTOCOL://`` URL (http, https, s3, gs, ... through fsspec), else
            by random access to local tar files. True reads local shards as streams too (the same
            path as remote ones); False refuses remote specs.
        transport: timeouts and retries for streamed shards (default :class:`TransportPolicy`).
        mix_weights: a ``;`` spec (``"data/cc3m/{00..287}.tar;data/cc12m/{00..1001}.tar"``, the official
            ``--train-data-list``) opens each part alike and mixes them (:mod:`~.mixed_source`), each
            training batch drawn from one part by these relative weights (default: the parts' sample
            counts); comma-separated text or a list.
        resampled: training batches draw their samples with replacement (the official
            ``--dataset-resampled``; a single source becomes a one-part mix).

    Raises:
        ValueError: a structural mistake (missing column, no shards matched, unreadable manifest); the
            message lists what was found.
    """
    from .mixed_source import MixedSource, is_mix_spec, open_mix, part_name

    if is_mix_spec(spec) or resampled:
        def open_part(part: SourceSpec) -> CaptionSource:
            return open_source(part, image_column=image_column, caption_columns=caption_columns,
                               key_column=key_column, label_column=label_column, bad_data=bad_data,
                               image_root_only=image_root_only, require_images=require_images,
                               streaming=streaming, transport=transport)

        if is_mix_spec(spec):
            return open_mix(os.fspath(spec), open_part, mix_weights, resampled)  # type: ignore[arg-type]
        if mix_weights is not None:
            raise ValueError("--data-weights needs several --data parts joined by ';'")
        name = part_name(os.fspath(spec)) if isinstance(spec, (str, os.PathLike)) else "data"
        return MixedSource([open_part(spec)], [name], None, resampled)
    if mix_weights is not None:
        raise ValueError("--data-weights needs several --data parts joined by ';'")
    if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec):
        spec = _spec_in_folder(os.fspath(spec))
    if isinstance(spec, (str, os.PathLike)) and os.fspath(spec).lower().endswith(MANIFEST_SUFFIXES):
        return ManifestSource(
            spec,
            image_column=image_column,
            caption_columns=caption_columns,
            key_column=key_column,
            label_column=label_column,
            bad_data=bad_data,
            image_root_only=image_root_only,
            require_images=require_images,
        )
    if not isinstance(spec, (str, os.PathLike, list, tuple)):
        raise TypeError(f"spec must be a path, a shard pattern or a list of them, got {type(spec).__name__}")
    if isinstance(spec, (list, tuple)) and not spec:
        raise ValueError("spec is an empty list of shards")
    remote = _remote_parts(spec)
    if streaming or (streaming is None and remote):
        from .stream_source import StreamingWebDatasetSource

        return StreamingWebDatasetSource(spec, caption_columns=caption_columns, label_column=label_column,
                                         bad_data=bad_data, transport=transport)
    if remote:
        raise ValueError(f"streaming=False but the spec names remote shards {remote[:3]}; local tar files "
                         "are needed for random access")
    from .webdataset_source import WebDatasetSource

    return WebDatasetSource(
        spec, caption_columns=caption_columns, label_column=label_column, bad_data=bad_data
    )


def _remote_parts(spec: SourceSpec) -> list[str]:
    """The '::'-separated parts of a shard spec that name streams (``pipe:`` or ``PROTOCOL://``)."""
    parts = [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
    return [p for part in parts for p in part.split("::") if is_stream_url(p)]


def _spec_in_folder(folder: str) -> str:
    """The one manifest in ``folder``, else a glob of its tar shards; otherwise say what is there."""
    names = sorted(os.listdir(folder))
    manifests = [n for n in names if n.lower().endswith(MANIFEST_SUFFIXES)]
    if len(manifests) == 1:
        return os.path.join(folder, manifests[0])
    if len(manifests) > 1:
        raise ValueError(f"folder {folder!r} holds several manifests {manifests}; pass one of them")
    if any(n.endswith(".tar") for n in names):
        return os.path.join(folder, "*.tar")
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    raise ValueError(
        f"folder {folder!r} holds no manifest ({', '.join(MANIFEST_SUFFIXES)}) and no .tar shards; "
        f"it holds: {shown or '(nothing)'}"
    )
