"""A shard URL opened as a byte stream, with read timeouts and bounded retries.

What is matched (the WebDataset spec conventions, after brace expansion):

- ``pipe:COMMAND``: the command's standard output (``pipe:cat d/000.tar``, ``pipe:aws s3 cp URL -``);
  cannot seek; a non-zero exit status is a transport error.
- ``http://`` / ``https://``: read with ``urllib``; a start offset is asked for with a ``Range`` header
  (a server that ignores it is read from the start and the bytes before the offset are discarded).
  Credentials in the URL (``https://user:password@host/...``) are sent as HTTP Basic authentication
  (not to another host a redirect leads to); a presigned URL's query (``?X-Amz-Signature=...``) is sent
  as given.
- any other ``PROTOCOL://`` (``s3://``, ``gs://``, ``hf://``, ``memory://``, ...): through ``fsspec``,
  which needs the protocol's backend package (``s3fs``, ``gcsfs``, ...); the error names it.
- ``file://PATH`` or a plain path: a local file (seekable).

A read that fails (HTTP 404/5xx, connection reset, a body shorter than its Content-Length, a command
that exits non-zero, no byte within ``timeout`` seconds) reopens the stream at the byte reached, at most
``retries`` times with a doubling pause; then :class:`TransportError` names the URL. Reads never wait
longer than ``timeout`` (fsspec backends use their own timeouts).

Every URL or command in a message or log line is shown redacted (:func:`~llm2clip_fast.redaction.redact`:
passwords, signatures, tokens and ``Authorization`` headers masked); ``.url`` keeps the real one.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import re
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO

from ..redaction import redact

logger = logging.getLogger("llm2clip_fast.data.stream")
_URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]+://)")
# fsspec protocol -> the package that provides it (named in the error when it is missing).
FSSPEC_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
                   "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
_DISCARD_CHUNK = 1 << 20
TAIL_BYTES = 1024  # a tar archive ends with two 512-byte blocks of zeros


class TransportError(Exception):
    """A shard could not be read after the allowed retries. Not an ``OSError``, so tar parsing never
    mistakes it for a damaged archive."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = redact(reason)
        super().__init__(f"{redact(url)}: {self.reason}")


@dataclass(frozen=True)
class TransportPolicy:
    """How hard to try a remote shard.

    Args:
        timeout: seconds a connect or a single read may stall before it counts as a failure.
        retries: reopenings allowed per shard read (a stream that breaks resumes at the byte reached).
        backoff: pause before the first retry in seconds, doubled for each further one.
    """

    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {self.backoff!r}")


def is_stream_url(spec: str) -> bool:
    """True for ``pipe:`` and ``PROTOCOL://`` URLs other than ``file://`` (those are read as streams)."""
    return bool(_URL.match(spec)) and not spec.lower().startswith("file://")


def local_path(url: str) -> str:
    """The path of a ``file://`` URL or plain path."""
    return url[len("file://"):] if url.lower().startswith("file://") else url


def check_backend(url: str) -> None:
    """Raise ImportError naming the package to install when ``url`` needs a missing fsspec backend."""
    protocol = _fsspec_protocol(url)
    if protocol is None:
        return
    package = FSSPEC_BACKENDS.get(protocol)
    try:
        import fsspec
    except ImportError:
        extra = f" {package}" if package else ""
        raise ImportError(f"reading {redact(url)!r} needs fsspec: pip install fsspec{extra}") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        extra = {"s3fs": "s3", "gcsfs": "gcs"}.get(package or "")
        hint = (f"pip install {package}" + (f" (or 'llm2clip_fast[{extra}]')" if extra else "") if package
                else f"install fsspec's {protocol!r} backend")
        raise ImportError(f"reading {redact(url)!r} needs fsspec's {protocol!r} backend: {hint} "
                          f"({exc})") from None
    except ValueError as exc:
        raise ValueError(f"shard URL {redact(url)!r} has a protocol fsspec does not know: {exc}") from None


def _fsspec_protocol(url: str) -> str | None:
    if url.startswith("pipe:") or not is_stream_url(url):
        return None
    protocol = url.split("://", 1)[0].lower()
    return None if protocol in ("http", "https") else protocol


class _PipeReader:
    """A shell command's stdout; reads wait at most ``timeout`` seconds for data."""

    def __init__(self, command: str, timeout: float):
        self.command, self.timeout = command, timeout
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        # Its own process group, so closing early ends the command's children too (``sh -c`` forks them).
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                                      start_new_session=True)
        self._fd = self._proc.stdout.fileno()

    def read(self, n: int = -1) -> bytes:
        n = _DISCARD_CHUNK if n is None or n < 0 else n
        ready, _, _ = select.select([self._fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"no data from the command within {self.timeout}s")
        data = os.read(self._fd, n)
        if not data:
            try:
                status = self._proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(
                    f"the command closed its output but did not exit within {self.timeout}s") from None
            if status != 0:
                self._stderr.seek(0)
                tail = self._stderr.read()[-300:].decode("utf-8", "replace").strip()
                raise OSError(redact(f"command {self.command!r} exited with status {status}"
                                     f"{f': {tail}' if tail else ''}"))
        return data

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


class _HttpBody:
    """An HTTP response body that raises ``IncompleteRead`` when it ends before its Content-Length
    (``HTTPResponse.read(n)`` just returns b"" then)."""

    def __init__(self, response: http.client.HTTPResponse):
        self._response = response

    def read(self, n: int = -1) -> bytes:
        data = self._response.read(None if n is None or n < 0 else n)
        if not data and n != 0 and self._response.length:
            raise http.client.IncompleteRead(b"", self._response.length)
        return data

    def close(self) -> None:
        self._response.close()


def http_request(url: str) -> urllib.request.Request:
    """The GET request of an http(s) URL: credentials in its userinfo (``user:password@``, each part
    percent-decoded) become an HTTP Basic ``Authorization`` header that is not sent on to where a
    redirect leads, and leave the URL (urllib would take them for part of the host name)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(pair).decode("ascii"))
    return request


def _open_at(url: str, offset: int, timeout: float) -> tuple[BinaryIO, int]:
    """(stream, byte offset it starts at): ``offset`` when the transport could seek there, else 0."""
    if url.startswith("pipe:"):
        return _PipeReader(url[len("pipe:"):], timeout), 0
    lowered = url.lower()
    if lowered.startswith(("http://", "https://")):
        request = http_request(url)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        response = urllib.request.urlopen(request, timeout=timeout)
        return _HttpBody(response), offset if offset and response.status == 206 else 0
    if is_stream_url(url):
        import fsspec

        handle = fsspec.open(url, "rb").open()
        if offset:
            handle.seek(offset)
        return handle, offset
    handle = open(local_path(url), "rb")  # closed by ShardStream.close
    handle.seek(offset)
    return handle, offset


# What a broken transport raises: sockets and files (OSError, TimeoutError), HTTP status errors
# (URLError is an OSError), short bodies and protocol errors (HTTPException).
_TRANSIENT = (OSError, http.client.HTTPException)


class ShardStream:
    """The bytes of one shard from byte ``start`` on, reopened where they broke (see the module doc).

    Attributes:
        position: absolute offset of the next byte :meth:`read` returns.
        discarded: bytes read and thrown away because the transport could not seek to where it was
            (re)opened; 0 when every (re)opening seeked.
        failures: transport failures met so far (each one cost a retry).
        tail: the last :data:`TAIL_BYTES` bytes read (a complete tar ends with that many zero bytes).
    """

    def __init__(self, url: str, start: int = 0, policy: TransportPolicy | None = None):
        self.url = url
        self.policy = policy or TransportPolicy()
        self.position = start
        self.discarded = 0
        self.failures = 0
        self.tail = b""
        self._raw: BinaryIO | None = None
        self._reopen(None)

    def _reopen(self, error: BaseException | None) -> None:
        while True:
            if error is not None:
                self._close_raw()
                self.failures += 1
                if self.failures > self.policy.retries:
                    raise TransportError(self.url, f"{type(error).__name__}: {error} "
                                                   f"(gave up after {self.policy.retries} retries)") from None
                logger.warning("stream: %s: %s: %s; retry %d of %d at byte %d", redact(self.url),
                               type(error).__name__, redact(str(error)), self.failures, self.policy.retries,
                               self.position)
                time.sleep(self.policy.backoff * 2 ** (self.failures - 1))
            try:
                self._raw, at = _open_at(self.url, self.position, self.policy.timeout)
                while at < self.position:  # the transport could not seek: read up to where we were
                    chunk = self._raw.read(min(_DISCARD_CHUNK, self.position - at))
                    if not chunk:
                        raise http.client.IncompleteRead(b"", self.position - at)
                    at += len(chunk)
                    self.discarded += len(chunk)
                return
            except _TRANSIENT as exc:
                error = exc

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data = self._raw.read(n)
            except _TRANSIENT as exc:
                self._reopen(exc)
                continue
            self.position += len(data)
            self.tail = (self.tail + data)[-TAIL_BYTES:] if len(data) < TAIL_BYTES else data[-TAIL_BYTES:]
            return data

    def drain(self) -> None:
        """Read to the end (what follows the last tar member: its end-of-archive blocks)."""
        while self.read(_DISCARD_CHUNK):
            pass

    def _close_raw(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except _TRANSIENT:
                pass  # closing a broken stream may fail again; nothing is left to read from it
            self._raw = None

    def close(self) -> None:
        self._close_raw()

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
