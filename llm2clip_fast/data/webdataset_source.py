"""WebDataset sources: tar shards of ``key.jpg|jpeg|png|webp`` + ``key.json`` and/or ``key.txt``.

Shard specs follow the WebDataset/OpenCLIP conventions: a brace pattern ("data/{000..009}.tar"),
several joined by "::", a glob ("data/*.tar"), or a list of any of these. Sequential reading
(``iter_records``) goes through the ``webdataset`` package; loaders need random access, which comes
from an index of the tar headers (member offsets), built on first use by scanning headers only.
Samples are grouped the WebDataset way: consecutive members with the same path up to the first dot of
the file name; the key is that prefix (``__key__``). Remote specs (``pipe:``, ``http(s)://``, fsspec
URLs such as ``s3://``) are read sequentially by :class:`~.stream_source.StreamingWebDatasetSource`.

Captions: every string field of the JSON except the key, label and image-ish fields, plus "caption"
from a ``.txt`` member (when the JSON has no "caption"). Shards here are local, uncompressed tar files.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from .bad_data import BadDataPolicy, BadDataTracker, BadSampleError
from .caption_source import CaptionSource, check_captions, decode_image
from .records import Record
from .stream_transport import is_stream_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
NON_CAPTION_FIELDS = frozenset(
    {"__key__", "__url__", "key", "image", "url", "image_path", "path", "filename"}
)
_GLOB_CHARS = set("*?[")


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError(
            "reading WebDataset shards needs the webdataset package: pip install 'llm2clip_fast[wds]'"
        ) from None
    return webdataset


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """Split a member name into (key, extension) the way WebDataset does."""
    return _webdataset().tariterators.base_plus_ext(name)


def shard_patterns(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The brace-expanded shard patterns of a spec ('::'-joined or a list), in order; a "file:" prefix
    is dropped."""
    wds = _webdataset()
    parts = [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
    patterns: list[str] = []
    for part in parts:
        patterns.extend(wds.shardlists.expand_urls(part))
    return [p[len("file:") :] if p.startswith("file:") else p for p in patterns]


def expand_shard_spec(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """(existing shard paths, patterns tried) for a local brace/glob/'::'/list spec, in the given order."""
    patterns = shard_patterns(spec)
    remote = [p for p in patterns if is_stream_url(p)]
    if remote:
        raise ValueError(
            f"remote shard URLs {remote[:3]} have no random access: open them with open_source, which "
            "reads them as a stream (StreamingWebDatasetSource)"
        )
    paths: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            paths.extend(sorted(glob.glob(pattern)))
        elif os.path.isfile(pattern):
            paths.append(pattern)
    return paths, patterns


def _what_is_there(patterns: list[str]) -> str:
    folders = sorted({os.path.dirname(p) or "." for p in patterns})[:3]
    lines = []
    for folder in folders:
        if os.path.isdir(folder):
            names = sorted(os.listdir(folder))
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
            lines.append(f"{folder!r} holds: {shown or '(nothing)'}")
        else:
            lines.append(f"folder {folder!r} does not exist")
    return "; ".join(lines)


@dataclass
class _Sample:
    shard: int
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


_END_OF_ARCHIVE = 1024  # a tar archive ends with two 512-byte blocks of zeros


def _index_shard(shard: int, path: str) -> tuple[list[_Sample], str | None]:
    """(samples, problem): a shard cut short keeps the samples read before the cut and says so.

    tarfile takes a file that ends exactly between two members (what a killed writer leaves), or a
    garbage header, for the end of the archive: only the two zero blocks that close a tar tell a
    complete shard from one cut there, so they are checked. A header claiming an impossible size (a
    PAX extended header of 2**40 bytes, which tarfile tries to read into memory) is damage too."""
    samples: list[_Sample] = []
    problem = None
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                ext = ext.lower()
                if not samples or samples[-1].key != key or ext in samples[-1].members:
                    samples.append(_Sample(shard, key, {}))
                samples[-1].members[ext] = (member.offset_data, member.size)
            end = tar.offset  # where tarfile stopped reading headers
        with open(path, "rb") as f:
            f.seek(end)
            closing = f.read(_END_OF_ARCHIVE)
        if closing != bytes(_END_OF_ARCHIVE):
            raise tarfile.ReadError(f"no tar end-of-archive blocks at byte {end} (the file is cut between "
                                    "two members, or a header there is damaged)")
    except (tarfile.ReadError, MemoryError, OverflowError) as exc:
        if not isinstance(exc, tarfile.ReadError):
            exc = _impossible_size(exc)
        if not samples:
            raise ValueError(f"shard {path!r} is not a readable uncompressed tar file: {exc}") from None
        problem = (
            f"shard {path!r} is truncated or damaged after {len(samples)} samples ({exc}); "
            "samples after that point cannot be read"
        )
    for sample in samples:  # a member cut by truncation reads short: drop it, so its sample is flagged bad
        sample.members = {e: (o, n) for e, (o, n) in sample.members.items() if o + n <= file_size}
    return samples, problem


def _impossible_size(exc: BaseException) -> tarfile.ReadError:
    """What tarfile's MemoryError or OverflowError on a header means: a size no shard can hold."""
    return tarfile.ReadError(f"a tar header claims more bytes than can be read ({type(exc).__name__}); the "
                             "header is damaged")


class _LocalSizes:
    """Sample counts of local shards from a ``sizes.json`` in their folder (OpenCLIP's convention: a
    JSON object mapping shard file name to count), each folder's file read once; a folder without a
    readable one (or a shard it does not list) has no count."""

    def __init__(self) -> None:
        self._tables: dict[str, dict] = {}

    def count(self, path: str) -> int | None:
        folder, name = os.path.split(path)
        if folder not in self._tables:
            try:
                with open(os.path.join(folder or ".", "sizes.json"), encoding="utf-8") as f:
                    table = json.load(f)
            except (OSError, ValueError):
                table = {}
            self._tables[folder] = table if isinstance(table, dict) else {}
        value = self._tables[folder].get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _image_ext(members: dict) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext
    return None


def _skip_rest_of_shard(exc: Exception) -> bool:
    """webdataset error handler: a damaged shard ends early; the header scan has already noted it."""
    return True


def learn_caption_fields(
    fields: dict,
    members: list[str],
    where: str,
    caption_columns: str | Sequence[str] | None,
    label_column: str | None,
) -> tuple[list[str], str | None]:
    """(caption names, label field or None) from the decoded fields of a source's first sample.

    ``caption_columns=None`` takes every string field but the key, label and image-ish ones; named
    columns must all be present. ``where`` and ``members`` name the sample in errors.
    """
    label = label_column if label_column is not None and label_column in fields else None
    available = [f for f, v in fields.items() if isinstance(v, str) and f not in NON_CAPTION_FIELDS]
    available = [f for f in available if f != label_column]
    if caption_columns is None:
        if not available:
            raise ValueError(f"{where} has no caption (members: {members}, json fields: {sorted(fields)})")
        return available, label
    names = [caption_columns] if isinstance(caption_columns, str) else list(caption_columns)
    missing = [c for c in names if c not in fields]
    if missing or not names:
        raise ValueError(
            f"{where} lacks caption field(s) {missing or names}; fields found: {sorted(fields)} "
            f"(members: {members})"
        )
    return names, label


def fields_from_members(key: str, members: dict[str, bytes]) -> dict:
    """Decoded JSON fields plus "caption" from a .txt member (JSON wins); ``members`` maps a lower-case
    extension to its bytes. A missing or invalid text member raises :class:`BadSampleError`."""
    fields: dict = {}
    if "json" not in members and "txt" not in members:
        raise BadSampleError(key, f"no .json or .txt member (members: {sorted(members)})")
    if "json" in members:
        try:
            fields = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSampleError(key, f"json member cannot be parsed: {exc}") from None
        if not isinstance(fields, dict):
            raise BadSampleError(key, f"json member is a {type(fields).__name__}, not an object")
    if "txt" in members and "caption" not in fields:
        fields["caption"] = members["txt"].decode("utf-8", errors="replace")
    return fields


class WebDatasetSource(CaptionSource):
    """Samples in WebDataset tar shards; see :func:`~.sources.open_source` for the arguments."""

    def __init__(
        self,
        spec: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        caption_columns: Sequence[str] | None = None,
        label_column: str | None = "label",
        bad_data: BadDataPolicy | float | None = None,
    ):
        self.shards, self.patterns = expand_shard_spec(spec)
        missing = [p for p in self.patterns if not (_GLOB_CHARS & set(p)) and not os.path.isfile(p)]
        if self.shards and missing:
            raise ValueError(
                f"{len(missing)} of the shards named by {spec!r} do not exist, e.g. {missing[:5]}; "
                f"{_what_is_there(missing)}"
            )
        if not self.shards:
            raise ValueError(
                f"no WebDataset shards matched {spec!r}; patterns tried: {self.patterns[:10]}"
                f"{' ...' if len(self.patterns) > 10 else ''}; {_what_is_there(self.patterns)}"
            )
        self._requested_label = label_column
        self.damaged_shards: dict[str, str] = {}
        # Samples a damaged shard lost past its cut (no key survives): the shortfall against what the
        # shard should hold, its count in a sizes.json beside it (OpenCLIP's convention) or else the
        # median count of the intact shards (shards are usually written with equal counts), at least
        # one per damaged shard. Loaders count them as bad data each epoch.
        self.lost_samples: dict[str, int] = {}
        self.bad_data = BadDataTracker(bad_data)
        self._index: list[_Sample] | None = None
        self._handles: dict[int, object] = {}
        self._handles_pid = os.getpid()
        self._last_fields: tuple[int, dict] | None = None  # loaders ask for captions then label of one sample
        first = self._first_sample()
        try:
            fields = self._fields(first)
        except BadSampleError as exc:
            raise ValueError(
                f"cannot learn the caption fields from the first sample of {self.shards[first.shard]!r}: "
                f"{exc} (members: {sorted(first.members)})"
            ) from None
        where = f"first sample {first.key!r} of shard {self.shards[first.shard]!r}"
        self.caption_names, self.label_column = learn_caption_fields(
            fields, sorted(first.members), where, caption_columns, label_column
        )

    # Index and raw reads ----------------------------------------------------------------------

    def _first_sample(self) -> _Sample:
        for shard, path in enumerate(self.shards):
            samples, _ = _index_shard(shard, path)
            if samples:
                return samples[0]
        raise ValueError(f"the shards {self.shards[:5]} hold no samples")

    def _damage(self) -> dict[str, str]:
        self.index  # noqa: B018 - building the index records damaged shards
        return self.damaged_shards

    @property
    def index(self) -> list[_Sample]:
        if self._index is None:
            index, intact_counts, damaged_counts = [], [], {}
            published = _LocalSizes()
            for shard, path in enumerate(self.shards):
                samples, problem = _index_shard(shard, path)
                listed = published.count(path)
                if problem is None and listed is not None and len(samples) < listed:
                    problem = (f"shard {path!r} holds {len(samples)} samples where its sizes.json lists "
                               f"{listed}; the others cannot be read")
                index.extend(samples)
                if problem is not None:
                    self.damaged_shards[path] = problem
                    damaged_counts[path] = len(samples)
                    self.bad_data.add_note(problem)
                    warnings.warn(problem, stacklevel=2)
                else:
                    intact_counts.append(len(samples))
            typical = statistics.median_low(intact_counts) if intact_counts else 0
            for path, count in damaged_counts.items():
                listed = published.count(path)
                self.lost_samples[path] = max(1, (typical if listed is None else listed) - count)
            self._index = index
        return self._index

    def _read(self, sample: _Sample, ext: str) -> bytes:
        if self._handles_pid != os.getpid():  # a forked DataLoader worker must not share file offsets
            self._handles, self._handles_pid = {}, os.getpid()
        handle = self._handles.get(sample.shard)
        if handle is None:
            handle = self._handles[sample.shard] = open(self.shards[sample.shard], "rb")
        offset, size = sample.members[ext]
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise BadSampleError(sample.key, f"{ext} member is truncated ({len(data)} of {size} bytes)")
        return data

    def _fields(self, sample: _Sample) -> dict:
        """Decoded JSON fields plus "caption" from .txt (JSON wins); invalid JSON raises BadSampleError."""
        fields: dict = {}
        if "json" not in sample.members and "txt" not in sample.members:
            raise BadSampleError(sample.key, f"no .json or .txt member (members: {sorted(sample.members)})")
        if "json" in sample.members:
            try:
                fields = json.loads(self._read(sample, "json").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadSampleError(sample.key, f"json member cannot be parsed: {exc}") from None
            if not isinstance(fields, dict):
                raise BadSampleError(sample.key, f"json member is a {type(fields).__name__}, not an object")
        if "txt" in sample.members and "caption" not in fields:
            fields["caption"] = self._read(sample, "txt").decode("utf-8", errors="replace")
        return fields

    def _fields_at(self, index: int) -> dict:
        if self._last_fields is not None and self._last_fields[0] == index:
            return self._last_fields[1]
        fields = self._fields(self.index[index])
        self._last_fields = (index, fields)
        return fields

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    # CaptionSource ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    def key_at(self, index: int) -> str:
        return self.index[index].key

    def raw_captions_at(self, index: int) -> dict[str, str]:
        fields = self._fields_at(index)
        return {n: fields[n] for n in self.caption_names if n in fields}

    def label_at(self, index: int) -> str | None:
        if self.label_column is None:
            return None
        try:
            value = self._fields_at(index).get(self.label_column)
        except BadSampleError:
            return None
        return None if value is None else str(value)

    def image_at(self, index: int) -> Image.Image:
        return decode_image(self.index[index].key, self.image_bytes_at(index), self.decode_min_side)

    def image_bytes_at(self, index: int) -> bytes:
        """The image member's bytes, undecoded (for decoding on the GPU)."""
        sample = self.index[index]
        ext = _image_ext(sample.members)
        if ext is None:
            raise BadSampleError(sample.key, f"no image member (members: {sorted(sample.members)})")
        return self._read(sample, ext)

    def record_at(self, index: int, with_image: bool = True) -> Record:
        sample = self.index[index]
        fields = self._fields(sample)
        captions = check_captions(sample.key, fields, self.caption_names)
        image = self.image_at(index) if with_image else None
        label = fields.get(self.label_column) if self.label_column else None
        return Record(sample.key, image, captions, None if label is None else str(label))

    def iter_records(self, bad_data: BadDataTracker | None = None) -> Iterator[Record]:
        """Stream every good record with the ``webdataset`` package, in shard order (no index needed)."""
        wds = _webdataset()
        tracker = bad_data if bad_data is not None else self.bad_data

        for problem in self._damage().values():  # the header scan finds and notes cut-short shards
            tracker.add_note(problem)
        shards = [{"url": path} for path in self.shards]
        for raw in wds.tarfile_samples(shards, handler=_skip_rest_of_shard):
            key = raw["__key__"]
            tracker.add_seen()
            try:
                yield self._record_from_stream(key, raw)
            except BadSampleError as bad:
                tracker.add_bad(bad.key, bad.reason)
                tracker.check()

    def _record_from_stream(self, key: str, raw: dict) -> Record:
        fields = fields_from_members(key, {k.lower(): v for k, v in raw.items() if not k.startswith("__")})
        captions = check_captions(key, fields, self.caption_names)
        ext = _image_ext({k.lower(): v for k, v in raw.items() if not k.startswith("__")})
        if ext is None:
            raise BadSampleError(
                key, f"no image member (members: {sorted(k for k in raw if not k.startswith('__'))})"
            )
        image = decode_image(key, raw[ext])
        label = fields.get(self.label_column) if self.label_column else None
        return Record(key, image, captions, None if label is None else str(label))

    def describe(self) -> str:
        n = f"{len(self._index)} samples" if self._index is not None else "not indexed yet"
        return (
            f"WebDatasetSource({len(self.shards)} shards from {self.patterns[:2]}, {n}, "
            f"captions={self.caption_names}, label={self.label_column!r})"
        )
