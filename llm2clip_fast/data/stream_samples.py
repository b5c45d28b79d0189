"""Samples of one tar shard read sequentially from a :class:`~.stream_transport.ShardStream`.

Samples are grouped the WebDataset way (consecutive members sharing the path up to the first dot of the
file name). Each carries its number within the shard and the byte offset of its first member's header,
so a reader can later start at that sample: the stream is opened at that offset (seeking where the
transport can, else reading and discarding the bytes before it).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..redaction import redact
from .stream_transport import TAIL_BYTES, ShardStream, TransportError, TransportPolicy

logger = logging.getLogger("llm2clip_fast.data.stream")


@dataclass
class StreamSample:
    """One sample as read from a stream: ``members`` maps a lower-case extension to its bytes."""

    shard: int  # index of the shard in the source's shard list
    number: int  # the sample's position within its shard (0-based)
    offset: int  # byte offset of its first member's tar header
    key: str
    members: dict[str, bytes] = field(default_factory=dict)


class ShardError(Exception):
    """A shard stopped before its end (transport gave up, or the archive is cut short or damaged)."""

    def __init__(self, url: str, reason: str, samples_read: int):
        self.url = url  # the real URL; messages show it redacted
        self.reason = redact(reason)
        super().__init__(f"shard {redact(url)!r}: {self.reason}")
        self.samples_read = samples_read


def _split_name(name: str) -> tuple[str | None, str | None]:
    from .webdataset_source import base_plus_ext

    return base_plus_ext(name)


def iter_shard(
    url: str,
    shard: int,
    *,
    start_number: int = 0,
    start_offset: int = 0,
    policy: TransportPolicy | None = None,
) -> Iterator[StreamSample]:
    """Yield the samples of ``url`` from sample ``start_number``, whose header is at ``start_offset``.

    Raises :class:`ShardError` after the samples that could be read when the transport gives up or the
    tar data ends early (the sample being read when it broke is yielded with the members it had).
    Logs a warning when the transport had to re-read and discard bytes to reach ``start_offset``.
    """
    number = start_number
    pending: StreamSample | None = None
    try:
        with ShardStream(url, start_offset, policy) as stream:
            if stream.discarded:
                logger.warning("stream: %s cannot seek; re-read and discarded %d bytes to resume at "
                               "sample %d",
                               redact(url), stream.discarded, start_number)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    if key is None:
                        continue
                    ext = ext.lower()
                    if pending is None or pending.key != key or ext in pending.members:
                        if pending is not None:
                            yield pending
                            number += 1
                        pending = StreamSample(shard, number, start_offset + member.offset, key)
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name!r} is truncated")
                    pending.members[ext] = data
            # tarfile takes a header cut short, or no header at all, for the end of the archive:
            # only the closing zero blocks tell a complete shard from one cut at a member boundary.
            stream.drain()
            if stream.tail != bytes(TAIL_BYTES):
                raise tarfile.ReadError("the stream ends without the tar end-of-archive blocks")
    except TransportError as exc:
        reason = exc.reason
    except (tarfile.TarError, EOFError) as exc:
        reason = f"the tar data is truncated or damaged ({exc})"
    except (MemoryError, OverflowError) as exc:  # a header claiming 2**40 bytes, read into memory at once
        reason = f"a tar header claims more bytes than can be read ({type(exc).__name__}): it is damaged"
    else:
        if pending is not None:
            yield pending
        return
    read = number - start_number
    if pending is not None:
        yield pending
        read += 1
    raise ShardError(url, reason, read)
