"""WebDataset shards read as streams: ``pipe:`` commands, ``http(s)://`` and fsspec URLs (``s3://``, ...).

A stream has no random access: samples come in shard order, so iteration (``iter_captions``,
``iter_records``, ``keys``) reads shards start to end, and loaders split whole shards over ranks and
workers (:mod:`~.stream_loader`). ``len(source)`` needs every shard's sample count: read from a
``sizes.json`` beside the shards (OpenCLIP's convention) when there is one, else learned by one
counting pass over the shards on first use, and kept. A shard the transport gives up on, or that ends
early, keeps the samples read before the break; the rest count as bad data (lost samples) with the
shard named: as many as the shard should hold (its ``sizes.json`` count, else the median count of the
intact shards) minus those read, and at least one. So a shard that yields nothing (a garbage body, a
``pipe:`` command that exits non-zero, an HTTP 404) counts as a whole shard lost, not as one sample.

Shard URLs may carry credentials (``https://user:pass@host/...``, presigned ``?X-Amz-Signature=...``
URLs, an ``Authorization`` header in a ``pipe:`` command): they are used as given and shown redacted.
"""

from __future__ import annotations

import json
import os
import statistics
import urllib.parse
from collections.abc import Iterator, Sequence

from PIL import Image

from ..redaction import redact
from .bad_data import BadDataPolicy, BadDataTracker, BadSampleError
from .caption_source import CaptionSource, check_captions, decode_image
from .records import Record
from .stream_samples import ShardError, StreamSample, iter_shard
from .stream_transport import ShardStream, TransportError, TransportPolicy, check_backend
from .webdataset_source import (
    IMAGE_EXTENSIONS,
    fields_from_members,
    learn_caption_fields,
    shard_patterns,
)

_GLOB_CHARS = set("*?[")


class StreamingWebDatasetSource(CaptionSource):
    """Samples of WebDataset shards read sequentially through :mod:`~.stream_transport`.

    Args:
        spec: shard URLs: a brace pattern ("http://host/d-{000..009}.tar", "pipe:cat d/{0..3}.tar"),
            several joined by "::", or a list. Local paths are allowed too (read as streams). Globs are
            not expanded (a stream cannot be listed): use braces.
        caption_columns, label_column, bad_data: as for :func:`~.sources.open_source`.
        transport: timeouts and retries of shard reads (default :class:`TransportPolicy`).

    Attributes:
        shards: the shard URLs in spec order.
        streaming: True (loaders take the streaming path for this source).
    """

    streaming = True

    def __init__(
        self,
        spec: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        caption_columns: str | Sequence[str] | None = None,
        label_column: str | None = "label",
        bad_data: BadDataPolicy | float | None = None,
        transport: TransportPolicy | None = None,
    ):
        self.shards = shard_patterns(spec)
        if not self.shards:
            raise ValueError(f"spec {spec!r} names no shards")
        globbed = [redact(u) for u in self.shards if has_glob(u)]
        if globbed:
            raise ValueError(f"spec {redact(str(spec))!r}: glob patterns cannot be listed over a stream "
                             f"({globbed[:3]}); name the shards with a brace pattern such as "
                             "d-{000..099}.tar")
        for url in dict.fromkeys(self.shards):
            check_backend(url)
        self.transport = transport or TransportPolicy()
        self.bad_data = BadDataTracker(bad_data)
        self.damaged_shards: dict[str, str] = {}  # problems met by the counting pass
        self.lost_samples: dict[str, int] = {}  # streams count their losses while they are read
        self._sizes: list[int] | None = None
        self._published = False  # the sizes came from sizes.json (else from a counting pass)
        self._broken: set[int] = set()  # shards the counting pass could not read to their end
        first = self._first_sample()
        where = f"first sample {first.key!r} of shard {self.shards[first.shard]!r}"
        try:
            fields = fields_from_members(first.key, first.members)
        except BadSampleError as exc:
            raise ValueError(f"cannot learn the caption fields from the {where}: {exc} "
                             f"(members: {sorted(first.members)})") from None
        self.caption_names, self.label_column = learn_caption_fields(
            fields, sorted(first.members), where, caption_columns, label_column
        )

    def _first_sample(self) -> StreamSample:
        problems = []
        for shard, url in enumerate(self.shards):
            try:
                for sample in iter_shard(url, shard, policy=self.transport):
                    return sample
            except ShardError as exc:
                problems.append(str(exc))
                if len(problems) >= 3:
                    break
        more = " ..." if len(self.shards) > 3 else ""
        shown = [redact(u) for u in self.shards[:3]]
        raise ValueError(f"no sample could be read from the shards {shown}{more}: "
                         f"{'; '.join(problems) or 'all are empty'}")

    # Sizes ------------------------------------------------------------------------------------

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard: from ``sizes.json`` files beside the shards when they list every shard
        (see :func:`published_sizes`), else from one counting pass on first use (a shard read only in
        part counts what was read; the problem is kept in ``damaged_shards``)."""
        if self._sizes is None:
            self._sizes = published_sizes(self.shards, self.transport)
            self._published = self._sizes is not None
        if self._sizes is None:
            sizes = []
            for shard, url in enumerate(self.shards):
                count = 0
                try:
                    for _ in iter_shard(url, shard, policy=self.transport):
                        count += 1
                except ShardError as exc:
                    count = exc.samples_read
                    self._broken.add(shard)
                    self.damaged_shards[redact(url)] = str(exc)
                    self.bad_data.add_note(str(exc))
                sizes.append(count)
            self._sizes = sizes
        return self._sizes

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    # Sequential reading -----------------------------------------------------------------------

    def iter_samples(self, tracker: BadDataTracker, shards: Sequence[int] | None = None,
                     ) -> Iterator[StreamSample]:
        """Raw samples of ``shards`` (default: all, in order); a shard that breaks counts its unread
        samples (:meth:`lost_after`) as lost in ``tracker`` with the shard named.

        A full pass (``shards`` None) before the sizes are known is itself the counting pass: it learns
        every shard's count, and the losses of the shards that broke are counted when it ends, against
        the intact shards' median."""
        learning = shards is None and self._sizes is None
        counts: list[int] = []
        broken: list[tuple[int, ShardError]] = []
        for shard in range(len(self.shards)) if shards is None else shards:
            read = 0
            try:
                for sample in iter_shard(self.shards[shard], shard, policy=self.transport):
                    read += 1
                    yield sample
            except ShardError as exc:
                read = exc.samples_read
                if learning:
                    broken.append((shard, exc))
                else:
                    tracker.add_lost(self.lost_after(shard, exc.samples_read), lost_note(exc))
                    tracker.check()
            counts.append(read)
        if learning and self._sizes is None:
            self._sizes = counts
            for shard, exc in broken:
                self._broken.add(shard)
                self.damaged_shards[redact(exc.url)] = str(exc)
        for shard, exc in broken:
            tracker.add_lost(self.lost_after(shard, exc.samples_read), lost_note(exc))
        if broken:
            tracker.check()

    def expected_size(self, shard: int) -> int:
        """How many samples ``shard`` should hold: its ``sizes.json`` count, else (for a shard the
        counting pass could not read to its end) the median count of the intact shards, else what the
        counting pass read. Counts the shards first if need be."""
        sizes = self.shard_sizes
        if self._published or shard not in self._broken:
            return sizes[shard]
        intact = [n for i, n in enumerate(sizes) if i not in self._broken]
        return max(sizes[shard], statistics.median_low(intact)) if intact else sizes[shard]

    def lost_after(self, shard: int, samples_read: int) -> int:
        """Samples of ``shard`` missed when a read broke after ``samples_read``: what the shard should
        hold (:meth:`expected_size`) minus what was read, at least one."""
        return max(1, self.expected_size(shard) - samples_read)

    def captions_of(self, sample: StreamSample) -> tuple[dict[str, str], str | None]:
        """(checked captions, label) of a raw sample; :class:`BadSampleError` for a bad one."""
        fields = fields_from_members(sample.key, sample.members)
        captions = check_captions(sample.key, fields, self.caption_names)
        label = fields.get(self.label_column) if self.label_column else None
        return captions, None if label is None else str(label)

    def image_of(self, sample: StreamSample) -> Image.Image:
        """The decoded RGB image of a raw sample; :class:`BadSampleError` when missing or broken."""
        for ext in IMAGE_EXTENSIONS:
            if ext in sample.members:
                return decode_image(sample.key, sample.members[ext], self.decode_min_side)
        raise BadSampleError(sample.key, f"no image member (members: {sorted(sample.members)})")

    def iter_captions(self, bad_data: BadDataTracker | None = None) -> Iterator[tuple[str, dict[str, str]]]:
        """``(key, {name: caption})`` of every good sample, reading the shards in order."""
        tracker = bad_data if bad_data is not None else self.bad_data
        for sample in self.iter_samples(tracker):
            tracker.add_seen()
            try:
                captions, _ = self.captions_of(sample)
            except BadSampleError as bad:
                tracker.add_bad(bad.key, bad.reason)
                tracker.check()
                continue
            yield sample.key, captions

    def iter_records(self, bad_data: BadDataTracker | None = None) -> Iterator[Record]:
        """Every good :class:`Record` (image decoded to RGB), reading the shards in order."""
        tracker = bad_data if bad_data is not None else self.bad_data
        for sample in self.iter_samples(tracker):
            tracker.add_seen()
            try:
                captions, label = self.captions_of(sample)
                record = Record(sample.key, self.image_of(sample), captions, label)
            except BadSampleError as bad:
                tracker.add_bad(bad.key, bad.reason)
                tracker.check()
                continue
            yield record

    def keys(self) -> list[str]:
        """All keys in shard order (one pass over the shards)."""
        return [s.key for s in self.iter_samples(BadDataTracker(1.0))]

    def labels(self) -> dict[str, str]:
        """key -> label for every sample with one (one pass over the shards)."""
        if self.label_column is None:
            return {}
        out = {}
        for sample in self.iter_samples(BadDataTracker(1.0)):
            try:
                _, label = self.captions_of(sample)
            except BadSampleError:
                continue
            if label is not None:
                out[sample.key] = label
        return out

    # Random access is what a stream lacks ------------------------------------------------------

    def _no_random_access(self, what: str):
        raise TypeError(f"{what}: a streaming source ({redact(self.shards[0])!r}, ...) is read in order "
                        "only; use iter_records / iter_captions / keys, or build_loader")

    def key_at(self, index: int) -> str:
        self._no_random_access("key_at")

    def raw_captions_at(self, index: int) -> dict[str, str]:
        self._no_random_access("raw_captions_at")

    def label_at(self, index: int) -> str | None:
        self._no_random_access("label_at")

    def image_at(self, index: int) -> Image.Image:
        self._no_random_access("image_at")

    def describe(self) -> str:
        n = f"{sum(self._sizes)} samples" if self._sizes is not None else "not counted yet"
        shown = [redact(u) for u in self.shards[:2]]
        return (f"StreamingWebDatasetSource({len(self.shards)} shards from {shown}, "
                f"{n}, captions={self.caption_names}, label={self.label_column!r})")


def published_sizes(shards: Sequence[str], transport: TransportPolicy) -> list[int] | None:
    """Sample counts from a ``sizes.json`` in each shard folder (OpenCLIP's convention: a JSON object
    mapping shard file name to sample count), read through the shards' transport; None when a shard is
    a ``pipe:`` command or a folder has no such file or it lacks one of the shards. The counts are
    trusted as written."""
    if any(url.startswith("pipe:") or "/" not in url for url in shards):
        return None
    tables: dict[str, dict] = {}
    once = TransportPolicy(timeout=transport.timeout, retries=0)
    for folder in dict.fromkeys(_folder_and_name(url)[0] for url in shards):
        try:
            chunks = []
            with ShardStream(f"{folder}/sizes.json", policy=once) as stream:
                while chunk := stream.read(1 << 16):
                    chunks.append(chunk)
            table = json.loads(b"".join(chunks))
        except (TransportError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(table, dict):
            return None
        tables[folder] = table
    sizes = []
    for url in shards:
        folder, name = _folder_and_name(url)
        count = tables[folder].get(name)
        if not isinstance(count, int) or count < 0:
            return None
        sizes.append(count)
    return sizes


def _folder_and_name(url: str) -> tuple[str, str]:
    """(folder URL, shard file name) of a shard URL; a query (a presigned URL's signature) is in
    neither, since ``sizes.json`` names shards by file name."""
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        folder, _, name = parts.path.rpartition("/")
        return urllib.parse.urlunsplit(parts._replace(path=folder, query="", fragment="")), name
    folder, _, name = url.rpartition("/")
    return folder, name


def has_glob(url: str) -> bool:
    """Whether a streamed shard spec holds glob characters that would need listing: in a URL's path
    (a ``?`` after it starts a presigned URL's query, not a glob), in a local path; never in a ``pipe:``
    command (its shell expands what it wants)."""
    if url.startswith("pipe:"):
        return False
    if "://" in url:
        return bool(_GLOB_CHARS & set(urllib.parse.urlsplit(url).path))
    return bool(_GLOB_CHARS & set(url))


def lost_note(exc: ShardError) -> str:
    """The bad-data note for a shard that broke: the URL (redacted) and why."""
    return f"shard {redact(exc.url)!r} stopped after {exc.samples_read} sample(s): {exc.reason}"
