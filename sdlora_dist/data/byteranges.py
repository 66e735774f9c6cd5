"""Opening bytes ``[begin, end)`` of a shard: a stream that starts at its first sample and stops after its last.

The manifest records each shard's per-sample byte offsets (``ShardInfo.offsets``, written by ``prepare``), so a
stream that starts inside a shard needs none of the bytes before it:

* a local file (or a ``data.cache_dir`` copy) seeks to ``begin``;
* ``http(s)://`` sends ``Range: bytes=begin-(end-1)`` (urllib; webdataset's curl opener cannot report whether the
  server honoured the range);
* ``s3://`` asks boto3 for a ranged ``GetObject`` (``Range=``).

A server that ignores the range (answers 200 with the whole body) is read forward from byte 0, dropping the bytes
before ``begin``, with a one-line warning per host and process. ``pipe:``, ``gs://`` and ``hf://`` streams are
always read that way (today's forward read, minus the tar parsing of the dropped samples). Every stream stops at
``end``, so no stream reads past its last sample; one that ends before ``end`` raises OSError (a cut connection),
which the shard reader retries like any remote failure.
"""

from __future__ import annotations

import functools
import http.client
import os
import urllib.error
import urllib.request
from typing import IO, Any
from urllib.parse import urlparse

from sdlora_dist.data import urls
from sdlora_dist.logs import log_warning

HTTP_TIMEOUT_S = 60.0  # per socket operation; a stalled server fails like a cut connection and is retried
_DROP_CHUNK = 1 << 20
_warned: set[str] = set()  # hosts already reported as ignoring ranges (once per process)


class Span:
    """Bytes ``[begin, end)`` of a shard read from ``stream`` (already positioned at ``begin``): reads stop at
    ``end``; a stream that runs dry before it raises OSError."""

    def __init__(self, stream: Any, length: int, url: str) -> None:
        self.stream, self.left, self.url = stream, length, url

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that is left for ``None`` or a negative size); b"" once ``end`` is reached."""
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        try:
            data = self.stream.read(size)
        except (http.client.HTTPException, OSError) as exc:  # IncompleteRead and friends are not OSErrors
            raise self._failed(f"{type(exc).__name__}: {exc}") from exc
        if not data:
            raise self._failed(f"the stream ended {self.left} bytes before the end of the requested range")
        self.left -= len(data)
        return data

    def _failed(self, reason: str) -> OSError:
        """A remote stream that broke is the server's fault (retried, then 'unreachable'); a local one is the
        shard's (a short file: named, or skipped under data.bad_shard=skip)."""
        return OSError(f"{self.url}: {reason}") if urls.is_local(self.url) else urls.RemoteUnavailable(reason)

    def close(self) -> None:
        """Close the underlying stream."""
        self.stream.close()


def open_span(url: str, begin: int, end: int) -> Span:
    """A stream of bytes ``[begin, end)`` of ``url``: seek for local files, a ranged GET for HTTP(S) and S3, a
    forward read dropping ``begin`` bytes otherwise (or when the server ignores the range)."""
    if urls.is_local(url):
        stream = urls.open_stream(url)
        stream.seek(begin)
        return Span(stream, end - begin, url)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https", "s3"):
        stream, start = open_ranged(url, begin, end)
        if start != begin:
            _warn_no_ranges(url)
    else:  # pipe:, gs://, hf://: openers without byte ranges
        stream, start = urls.open_stream(url), 0
    try:
        _drop(stream, begin - start, url)
    except BaseException:
        stream.close()
        raise
    return Span(stream, end - begin, url)


def open_ranged(url: str, begin: int, end: int) -> tuple[IO[bytes], int]:
    """A ranged GET of bytes ``[begin, end)`` of an ``http(s)://`` or ``s3://`` URL: (the body, the byte it starts
    at): ``begin``, or 0 when the server ignored the range and sent the whole object."""
    return (_s3_ranged if url.startswith("s3://") else _http_ranged)(url, begin, end)


def _http_ranged(url: str, begin: int, end: int) -> tuple[IO[bytes], int]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={begin}-{end - 1}"})
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)  # noqa: S310 (the user's shard URL)
    except urllib.error.HTTPError as exc:  # 401/403/404/410 refused at once, the rest retried (urls.http_error)
        exc.close()
        raise urls.http_error(url, exc.code, f"HTTP {exc.code} {exc.reason}") from None
    except (http.client.HTTPException, OSError) as exc:  # URLError (refused, DNS), resets, timeouts
        raise urls.RemoteUnavailable(f"{type(exc).__name__}: {exc}") from exc
    if response.status == 206 and _range_start(response.headers.get("Content-Range")) == begin:
        return response, begin
    if response.status == 200:
        return response, 0
    response.close()
    raise urls.RemoteUnavailable(f"unexpected answer to a ranged GET: HTTP {response.status}")


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes A-B/N`` header, None when absent or malformed."""
    unit, _, rest = (content_range or "").partition(" ")
    first = rest.partition("-")[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _s3_ranged(url: str, begin: int, end: int) -> tuple[IO[bytes], int]:
    answer = urls.s3_get_object(
        url, lambda endpoint: _s3_client(os.getpid(), endpoint), Range=f"bytes={begin}-{end - 1}"
    )  # failures classified like the forward opener's
    start = _range_start(answer.get("ContentRange"))
    return answer["Body"], begin if start == begin else 0


@functools.lru_cache(maxsize=8)
def _s3_client(pid: int, endpoint: str | None) -> Any:
    """One boto3 client per process and endpoint: making one takes tens of milliseconds, and every segment of every
    shard opens a ranged GET. Keyed by the pid so a forked loader worker never shares its parent's connections."""
    del pid  # part of the cache key only
    return urls.s3_client(endpoint)  # one attempt per request: our retries are the only ones


def _drop(stream: Any, count: int, url: str) -> None:
    """Read and discard ``count`` bytes (the part of a forward read before the span)."""
    while count > 0:
        data = stream.read(min(count, _DROP_CHUNK))
        if not data:
            raise urls.RemoteUnavailable(f"the stream ended {count} bytes before the requested range")
        count -= len(data)


def _warn_no_ranges(url: str) -> None:
    host = urlparse(url).netloc
    if host not in _warned:
        _warned.add(host)
        # once per process: rank 0's loader workers each say it once
        log_warning(
            f"warning: {host} ignores byte-range requests (answered 200 with the whole shard); each stream reads "
            "its shards from the start and drops the samples before its own (slower); serve the shards from a "
            "server with Range support (nginx, S3, GCS) or set data.cache_dir"
        )
