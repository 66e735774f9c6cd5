"""Where a shard set lives: a local folder or any URL webdataset opens, read as forward-only byte streams.

A shard set's location is a folder path or a URL prefix; ``manifest.json`` and every shard are found under it
(``join(location, "train/task_000/shard-000000.tar")``). Every byte goes through ``webdataset.gopen``:

* local paths and ``file://``: ``open``;
* ``http(s)://``: curl (webdataset's opener);
* ``pipe:CMD``: the command's stdout (the relative path is appended to CMD's last word, e.g. ``pipe:cat /data/x``);
* ``gs://``: gsutil; ``hf://``: the Hugging Face hub through curl (webdataset's openers);
* ``s3://``: boto3 ``GetObject``, registered here as webdataset's ``s3`` opener. Neither the AWS CLI (``pipe:aws s3
  cp``) nor s3fs is needed: boto3 is pure Python (``pip install 'sdlora-dist[s3]'``) and streams the object body
  forward-only. Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE`` and ``~/.aws/credentials``, instance or pod roles); a custom endpoint (MinIO, Ceph, moto) from
  ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), the region from ``AWS_DEFAULT_REGION``.

Remote reads that fail are retried (``RETRIES`` times, exponential backoff from ``BACKOFF_S``) by the callers that
know how far they got (``read_bytes`` here, the shard reader in ``pipeline``); then a UserError names the URL.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

from sdlora_dist.errors import UserError

RETRIES = 3  # re-opens after the first failure of a remote read
BACKOFF_S = 0.5  # first wait; doubles per retry
REMOTE_ERRORS = (OSError, ValueError, EOFError)  # what curl pipes, boto3 streams and tarfile raise on a cut stream
T = TypeVar("T")
# the module (``webdataset.gopen`` as an attribute is the function of the same name)
wds_gopen = importlib.import_module("webdataset.gopen")


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    """webdataset opener for ``s3://bucket/key``: the object body as a forward-only stream (boto3)."""
    if mode[0] != "r":
        raise ValueError(f"{url}: only reading is supported")
    try:
        import boto3
        import botocore.exceptions
    except ImportError as exc:
        raise UserError(f"{url}: s3:// needs boto3; install it with pip install 'sdlora-dist[s3]'") from exc
    parsed = urlparse(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    try:
        body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=parsed.netloc, Key=parsed.path[1:])["Body"]
    except botocore.exceptions.ClientError as exc:
        raise FileNotFoundError(f"{url}: {exc}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise OSError(f"{url}: {exc}") from exc
    return body  # botocore StreamingBody: read(n), close()


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


def with_retries(url: str, attempt: Callable[[], T], what: str = "read") -> T:
    """Run ``attempt`` (which opens and reads ``url``); retry remote failures with backoff, then a UserError."""
    tries = 1 if is_local(url) else RETRIES + 1
    for n in range(tries):
        try:
            return attempt()
        except UserError:
            raise
        except REMOTE_ERRORS as exc:
            if n + 1 == tries:
                raise UserError(
                    f"could not {what} {url} after {tries} attempt(s) ({type(exc).__name__}: {first_line(exc)}); "
                    "check the URL, the server and the credentials"
                ) from exc
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
    """The first line of an exception's text, at most 300 characters."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
