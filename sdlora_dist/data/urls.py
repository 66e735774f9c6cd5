"""Where a shard set lives: a local folder or any URL webdataset opens, read as forward-only byte streams.

A shard set's location is a folder path or a URL prefix; ``manifest.json`` and every shard are found under it
(``join(location, "train/task_000/shard-000000.tar")``). Every byte goes through ``webdataset.gopen``:

* local paths and ``file://``: ``open``;
* ``http(s)://``: curl with its own retries off (``CurlStream``, registered here), so the retry policy below is
  the only one and the HTTP status of a failure is known;
* ``pipe:CMD``: the command's stdout (the relative path is appended to CMD's last word, e.g. ``pipe:cat /data/x``);
* ``gs://``: gsutil; ``hf://``: the Hugging Face hub through curl (webdataset's openers);
* ``s3://``: boto3 ``GetObject``, registered here as webdataset's ``s3`` opener. Neither the AWS CLI (``pipe:aws s3
  cp``) nor s3fs is needed: boto3 is pure Python (``pip install 'sdlora-dist[s3]'``) and streams the object body
  forward-only. Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE`` and ``~/.aws/credentials``, instance or pod roles); a custom endpoint (MinIO, Ceph, moto) from
  ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), the region from ``AWS_DEFAULT_REGION``.

Remote failures are classified by type where they happen (:class:`RemoteRefused`, :class:`RemoteUnavailable`):

* refused (HTTP 401/403/404/410, S3 AccessDenied/InvalidAccessKeyId/NoSuchBucket/NoSuchKey, no credentials): the
  URL or the credentials are wrong and retrying cannot help, so a UserError names the URL, the status and the fix
  at once;
* unavailable (HTTP 5xx/408/429, refused or reset connections, timeouts, a stream cut short): retried
  (``RETRIES`` times, exponential backoff from ``BACKOFF_S``) by the callers that know how far they got
  (``read_bytes`` here, the shard reader in ``reading``), then :class:`ServerUnreachable` says the server was
  unreachable and to resume when it is back. The data is not blamed: only a size or checksum mismatch is.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

from sdlora_dist.errors import ServerUnreachable, UserError

RETRIES = 3  # re-opens after the first failure of a remote read
BACKOFF_S = 0.5  # first wait; doubles per retry
REMOTE_ERRORS = (OSError, ValueError, EOFError)  # what curl pipes, boto3 streams and tarfile raise on a cut stream
T = TypeVar("T")
# the module (``webdataset.gopen`` as an attribute is the function of the same name)
wds_gopen = importlib.import_module("webdataset.gopen")


class RemoteRefused(OSError):
    """The server answered and refused: wrong credentials or policy, or no such object or bucket (not retried)."""

    def __init__(self, url: str, status: str, fix: str) -> None:
        super().__init__(f"{url}: {status}")
        self.url, self.status, self.fix = url, status, fix

    def user_error(self) -> UserError:
        """The one line for the user: the URL, the status and what to do."""
        return UserError(f"cannot read {self.url}: {self.status}; {self.fix}")


class RemoteUnavailable(OSError):
    """The server could not be reached, answered 5xx/408/429, timed out or cut the stream (retried)."""


_CREDENTIALS_FIX = (
    "the server refused the credentials or its policy forbids this read: check AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (s3://), or the URL's access rights (http)"
)
_URL_FIX = "check the URL (--data / data.shards) and that the whole shard set was uploaded there"
_REFUSED_HTTP = {401: _CREDENTIALS_FIX, 403: _CREDENTIALS_FIX, 404: _URL_FIX, 410: _URL_FIX}
_BUCKET_FIX = "no such bucket: check the bucket name in the URL (--data / data.shards)"
_REFUSED_S3 = {
    "AccessDenied": _CREDENTIALS_FIX, "InvalidAccessKeyId": _CREDENTIALS_FIX,
    "SignatureDoesNotMatch": _CREDENTIALS_FIX, "ExpiredToken": _CREDENTIALS_FIX, "NoSuchKey": _URL_FIX,
    "NoSuchBucket": _BUCKET_FIX,
}  # fmt: skip
_CURL_STATUS = "sdlora-http-status="


class CurlStream:
    """``curl`` of an http(s) URL as a forward-only byte stream, with curl's own retries off.

    webdataset's opener runs ``curl --retry 30`` inside every attempt of ours (a 503 server was reported after
    248 s) and drops curl's exit status detail; here a failed transfer raises :class:`RemoteRefused` or
    :class:`RemoteUnavailable` with the HTTP status once the body ends.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.error: OSError | bool | None = None  # None: not known yet; False: the transfer succeeded
        argv = ["curl", "--silent", "--show-error", "--fail", "--location", "--retry", "0", "--connect-timeout", "30",
                "--speed-limit", "1", "--speed-time", "60", "--write-out", f"%{{stderr}}{_CURL_STATUS}%{{http_code}}",
                url]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all when -1); at the end of the body, the transfer's failure if it failed."""
        data = self.proc.stdout.read(size)
        if size < 0 or (not data and size != 0):  # the end of the body: did the transfer fail?
            self._check()
        return data

    def _check(self) -> None:
        if self.error is None:
            self.error = self._failure()
        if self.error is not False:
            raise self.error

    def _failure(self) -> OSError | bool:
        """The transfer's failure as RemoteRefused/RemoteUnavailable, or False when curl succeeded."""
        code = self.proc.wait()
        if code == 0:
            return False
        err = self.proc.stderr.read().decode(errors="replace")
        status = err.rpartition(_CURL_STATUS)[2].strip()
        detail = err.rpartition(_CURL_STATUS)[0].strip().splitlines()
        http = int(status) if status.isdigit() else 0
        reason = f"HTTP {http}" if http >= 400 else f"curl exit {code}"  # 200 then cut: the transfer failed
        reason += f" ({detail[-1]})" if detail else ""
        return http_error(self.url, http, reason)

    def close(self) -> None:
        """Stop the transfer (a reader may stop early) and reap curl."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def _gopen_http(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> CurlStream:
    """webdataset opener for ``http(s)://``: :class:`CurlStream`."""
    if mode[0] != "r":
        raise ValueError(f"{url}: only reading is supported")
    return CurlStream(url)


wds_gopen.gopen_schemes["http"] = wds_gopen.gopen_schemes["https"] = _gopen_http


def http_error(url: str, status: int, reason: str) -> OSError:
    """An HTTP error status as RemoteRefused (401/403/404/410: retrying cannot help) or RemoteUnavailable."""
    if status in _REFUSED_HTTP:
        return RemoteRefused(url, reason, _REFUSED_HTTP[status])
    return RemoteUnavailable(reason)


def s3_target(url: str) -> tuple[str, str, str | None]:
    """(bucket, key, endpoint) of an ``s3://`` URL; UserError naming the extra when boto3 is not installed."""
    try:
        import boto3  # noqa: F401  (imported here to give the install hint)
    except ImportError as exc:
        raise UserError(f"{url}: s3:// needs boto3; install it with pip install 'sdlora-dist[s3]'") from exc
    parsed = urlparse(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return parsed.netloc, parsed.path[1:], endpoint


def s3_client(endpoint: str | None) -> Any:
    """A boto3 S3 client that tries each request once: our retry policy is the only one (see the module doc)."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=endpoint, config=BotoConfig(retries={"total_max_attempts": 1}))


def no_credentials(url: str) -> RemoteRefused:
    """boto3 found no credentials at all: a refusal, not a server fault."""
    return RemoteRefused(url, "no AWS credentials found", _CREDENTIALS_FIX)


def s3_error(url: str, exc: Exception) -> OSError:
    """A botocore ClientError as RemoteRefused (credentials, policy, no such bucket/key) or RemoteUnavailable."""
    error = getattr(exc, "response", {}).get("Error", {})
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code", ""))
    reason = f"S3 {code or 'error'} (HTTP {status})"
    if code in _REFUSED_S3:
        return RemoteRefused(url, reason, _REFUSED_S3[code])
    if status in _REFUSED_HTTP:
        return RemoteRefused(url, reason, _REFUSED_HTTP[status])
    return RemoteUnavailable(reason)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    """webdataset opener for ``s3://bucket/key``: the object body as a forward-only stream (boto3)."""
    if mode[0] != "r":
        raise ValueError(f"{url}: only reading is supported")
    return s3_get_object(url)["Body"]  # botocore StreamingBody: read(n), close()


def s3_get_object(url: str, get_client: Callable[[str | None], Any] = s3_client, **kwargs: Any) -> dict[str, Any]:
    """boto3's ``get_object`` answer for an ``s3://`` URL (``kwargs``: e.g. ``Range``), its failures classified:
    refusals (credentials, policy, no such bucket or key) as RemoteRefused, the rest as RemoteUnavailable."""
    bucket, key, endpoint = s3_target(url)
    import botocore.exceptions  # installed with boto3 (s3_target checked)

    try:
        return get_client(endpoint).get_object(Bucket=bucket, Key=key, **kwargs)
    except botocore.exceptions.ClientError as exc:
        raise s3_error(url, exc) from exc
    except botocore.exceptions.NoCredentialsError as exc:
        raise no_credentials(url) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from exc


wds_gopen.gopen_schemes["s3"] = _gopen_s3


def is_local(location: str | Path) -> bool:
    """True for a plain path or a ``file://`` URL (read with ``open``, no retries needed)."""
    text = str(location)
    return text.startswith("file://") or "://" not in text and not text.startswith("pipe:")


def local_path(location: str | Path) -> Path:
    """The filesystem path of a local location."""
    text = str(location)
    return Path(urlparse(text).path) if text.startswith("file://") else Path(text)


def join(location: str | Path, rel: str) -> str:
    """``location/rel`` for a folder, a URL prefix or a ``pipe:`` command (whose last word is the prefix)."""
    return str(location).rstrip("/") + "/" + rel


def same_location(a: str | Path, b: str | Path) -> bool:
    """Whether two locations name the same shard set (local ones compared as resolved paths)."""
    if is_local(a) and is_local(b):
        return local_path(a).resolve() == local_path(b).resolve()
    return str(a).rstrip("/") == str(b).rstrip("/")


def display(location: str | Path) -> str:
    """The location as it goes into run.json: an absolute path for a local folder, the URL otherwise."""
    return str(local_path(location).resolve()) if is_local(location) else str(location)


def open_stream(url: str) -> IO[bytes]:
    """A forward-only byte stream of ``url`` through ``webdataset.gopen`` (local paths included)."""
    return wds_gopen.gopen(str(local_path(url)) if is_local(url) else url, "rb")


def unreachable(url: str, attempts: int, started: float, reason: str, what: str = "read") -> ServerUnreachable:
    """The error after the retries of a remote read ran out: the server, not the data, is at fault."""
    return ServerUnreachable(
        f"could not {what} {url}: the server was unreachable ({attempts} attempt(s) over "
        f"{time.monotonic() - started:.0f} s, last: {reason}); the data is not at fault: run again when it is back"
    )


def with_retries(url: str, attempt: Callable[[], T], what: str = "read") -> T:
    """Run ``attempt`` (which opens and reads ``url``): a refusal raises at once (UserError), other remote failures
    are retried with backoff, then :class:`ServerUnreachable`; a local one is a UserError at once."""
    tries = 1 if is_local(url) else RETRIES + 1
    started = time.monotonic()
    for n in range(tries):
        try:
            return attempt()
        except UserError:
            raise
        except RemoteRefused as exc:
            raise exc.user_error() from None
        except REMOTE_ERRORS as exc:
            reason = f"{type(exc).__name__}: {first_line(exc)}"
            if is_local(url):
                raise UserError(f"could not {what} {url} ({reason})") from exc
            if n + 1 == tries:
                raise unreachable(url, tries, started, reason, what) from exc
            time.sleep(BACKOFF_S * 2**n)
    raise AssertionError("unreachable")


def read_bytes(url: str) -> bytes:
    """The whole content of ``url`` (small files such as manifest.json), retried as ``with_retries`` says."""

    def attempt() -> bytes:
        stream = open_stream(url)
        try:
            return stream.read()
        finally:
            stream.close()

    return with_retries(url, attempt)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, at most 300 characters (webdataset appends the source and URL to
    an error's args on its way up: the message is the first of them)."""
    args = exc.args
    text = (str(args[0]) if len(args) > 1 and isinstance(args[0], str) else str(exc)).strip().splitlines()
    return text[0][:300] if text else ""
