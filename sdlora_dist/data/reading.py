"""Reading shards: forward-only streams of tar samples, the local cache of remote shards, counted decoding.

Shards are read through ``webdataset.gopen`` (``urls.open_stream``) and webdataset's tar iterators
(``tar_file_expander`` -> ``group_by_keys``) from a folder or any URL ``urls`` lists. A segment of a shard whose
manifest entry has per-sample byte offsets is opened at its first sample and stops after its last (a seek, an HTTP
``Range`` or S3 ranged GET: ``byteranges``); without offsets, a local file's skipped prefix costs its tar headers
and a remote stream reads and drops it. A remote read that fails mid-shard is re-opened up to ``urls.RETRIES``
times with backoff, resuming after the last sample it got; then a UserError names the shard and URL
(``bad_shard="error"``) or its missing samples come back as error items, counted as corrupt (``"skip"``). Local
shards are checked for existence and size first (no hashing). ``cache_dir``: a remote shard is downloaded once to
``cache_dir/<sha256>.tar`` (streamed, its sha256 checked against the manifest, atomically renamed) and read from
there; later epochs and runs reuse it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import webdataset.tariterators as wds_tar
from PIL import Image

from sdlora_dist.config import ShardPolicy
from sdlora_dist.data import byteranges, urls
from sdlora_dist.data.images import open_rgb
from sdlora_dist.data.manifest import Manifest, ShardInfo, prepare_command, shard_problem
from sdlora_dist.data.planning import Piece, Segment
from sdlora_dist.errors import UserError
from sdlora_dist.logs import log_warning

POLICIES = get_args(ShardPolicy)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_MAX_KEYS_KEPT = 100


@dataclass
class LoaderStats:
    """What a loader skipped, summed over its workers; read it after the loop and report it."""

    samples: int = 0  # samples decoded and yielded
    corrupt: int = 0  # samples that could not be decoded (skipped)
    corrupt_keys: list[str] = field(default_factory=list)  # the first few of them, "shard:key"
    refilled: int = 0  # train slots refilled with another sample of the same batch
    bad_shards: list[str] = field(default_factory=list)  # shards left out under bad_shard="skip" (usable_shards)

    def add(self, delta: dict[str, Any]) -> None:
        """Merge a worker's delta."""
        self.samples += delta["samples"]
        self.corrupt += delta["corrupt"]
        self.refilled += delta["refilled"]
        self.corrupt_keys += delta["corrupt_keys"][: max(0, _MAX_KEYS_KEPT - len(self.corrupt_keys))]

    def summary(self) -> str:
        """One line for the log."""
        text = f"{self.samples} samples, {self.corrupt} corrupt skipped"
        if self.corrupt_keys:
            text += f" (e.g. {', '.join(self.corrupt_keys[:3])})"
        if self.bad_shards:
            text += f", {len(self.bad_shards)} bad shard(s) skipped: {', '.join(self.bad_shards)}"
        return text


def new_delta() -> dict[str, Any]:
    """A worker's counts since its last batch (merged into ``LoaderStats`` by the loader)."""
    return {"samples": 0, "corrupt": 0, "corrupt_keys": [], "refilled": 0}


class ShardError(Exception):
    """A shard could not be read to the count the manifest gives (truncated, corrupt, missing, connection cut)."""


@dataclass
class Item:
    """A sample read from a shard (``files``) or why it could not be (``error``)."""

    shard: str
    key: str
    files: dict[str, bytes] | None
    error: str | None = None


def tar_samples(url: str, first: int = 0, span: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar from sample ``first`` on, in order: ``webdataset.gopen`` -> ``tar_file_expander`` ->
    ``group_by_keys``. With ``span`` (the byte offsets where sample ``first`` starts and the last wanted sample
    ends, from the manifest) only those bytes are read: a seek or a ranged GET (``byteranges.open_span``).
    Without it, a local file (or a cached copy) skips the samples before ``first`` by reading their tar headers
    only; a remote stream reads them and drops them."""
    stream = urls.open_stream(url) if span is None else byteranges.open_span(url, *span)
    if span is not None:
        first = 0  # the stream starts at sample ``first``
    try:
        if first and urls.is_local(url):
            # headers through the unbuffered file: a buffered one would read a whole buffer after every seek
            stream.seek(_sample_offset(getattr(stream, "raw", stream), first))
            first = 0
        files = wds_tar.tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        yield from itertools.islice(wds_tar.group_by_keys(files), first, None)
    finally:
        try:
            stream.close()
        except OSError:  # a pipe stopped early exits on SIGPIPE; read errors already surfaced in read()
            pass


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: names that belong to no sample


def _sample_starts(stream: Any) -> Iterator[tuple[int, int]]:
    """``(header offset, data end)`` of each sample of a seekable tar (webdataset's grouping: a sample is a run of
    regular members with one ``base_plus_ext`` key); the data end is where the sample's last member ends, padded
    to the tar block. tarfile's seekable mode reads each header and seeks over the member's data, so a sample costs
    its headers only."""
    tar = tarfile.open(fileobj=stream, mode="r:")
    key, start, end = None, None, 0
    while (member := tar.next()) is not None:
        if not member.isreg() or _META.match(member.name):
            continue
        prefix = wds_tar.base_plus_ext(member.name)[0]
        if prefix is not None and prefix != key:
            if start is not None:
                yield start, end
            key, start = prefix, member.offset
        end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if start is not None:
        yield start, end


def _sample_offset(stream: Any, first: int) -> int:
    """Byte offset of the header that starts sample ``first`` of a seekable tar."""
    count = 0
    for count, (start, _) in enumerate(_sample_starts(stream), start=1):
        if count == first + 1:
            return start
    raise ShardError(f"ends after {count} samples, fewer than the {first + 1} the manifest promises")


def sample_offsets(path: str | Path) -> list[int]:
    """The manifest's ``offsets`` of a local shard: where each sample's first header starts, then where the last
    sample ends (read from the tar headers; for shard sets written before ``prepare`` recorded them)."""
    with open(path, "rb", buffering=0) as stream:  # unbuffered: a buffered file reads a buffer after every seek
        starts = list(_sample_starts(stream))
    return [start for start, _ in starts] + [starts[-1][1] if starts else 0]


def repair_advice(location: str | Path, manifest: Manifest | None) -> str:
    """What to do about a damaged shard, as commands that run when pasted: the ``sdlora data prepare`` that
    repairs a local shard set in place, or leaving the shard out with ``--set data.bad_shard=skip``."""
    skip = "leave it out with --set data.bad_shard=skip"
    if not urls.is_local(location):
        return f"{skip}, or upload it again from the shard set 'sdlora data prepare' wrote"
    if manifest is None:
        return f"{skip}, or repair it with the 'sdlora data prepare' command that wrote {location}"
    return f"{skip}, or repair it in place with: {prepare_command(manifest, urls.local_path(location))}"


class ShardSource:
    """Where the shards are read from: the location, the optional local cache, the bad-shard policy."""

    def __init__(
        self, location: str | Path, cache_dir: str | Path | None, bad_shard: str, advice: str = ""
    ) -> None:
        self.location, self.bad_shard = str(location), bad_shard
        self.advice = advice or repair_advice(location, None)
        self.cache_dir = None if cache_dir is None or urls.is_local(location) else Path(cache_dir)

    def url(self, shard: ShardInfo) -> str:
        """The URL (or path) the shard is streamed from: the cached copy when the cache is on."""
        remote = urls.join(self.location, shard.path)
        return remote if self.cache_dir is None else str(self._cached(remote, shard))

    def _cached(self, remote: str, shard: ShardInfo) -> Path:
        """``cache_dir/<sha256>.tar``, downloaded once (streamed, hashed, atomically renamed) and checked."""
        path = self.cache_dir / f"{shard.sha256}.tar"
        if path.is_file() and path.stat().st_size == shard.bytes:
            return path  # written only after its sha256 matched (below); a size change means it was altered
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{shard.sha256[:16]}.", suffix=".part")
        os.close(fd)
        try:
            digest = urls.with_retries(remote, lambda: _download(remote, Path(tmp)), "download")
            if digest != shard.sha256:
                raise UserError(
                    f"shard {remote} does not match the manifest's sha256 (got {digest[:12]}..., expected "
                    f"{shard.sha256[:12]}...); re-upload the shard set or fix its manifest.json"
                )
            umask = os.umask(0o022)  # mkstemp files are 0600: give the cache the permissions of a normal file
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def piece_items(self, piece: Piece) -> Iterator[Item]:
        """The samples of a piece's segments, in order."""
        for seg in piece:
            yield from self.segment_items(seg)

    def segment_items(self, seg: Segment) -> Iterator[Item]:
        """The samples of ``seg`` in order; a failed remote read is re-opened (bounded, with backoff) and resumes
        after the last sample it yielded. A refusal (credentials, no such object) and a server that stayed
        unreachable raise at once; a shard that is short or corrupt is named (``bad_shard='error'``) or its
        missing samples come back as error items (``'skip'``), so the stream keeps its length."""
        url = self.url(seg.shard)
        done, failures, started = 0, 0, time.monotonic()
        while True:
            try:
                yield from self._read(url, seg, done)
                return
            except _Progress as progress:
                done, reason, cause = progress.done, progress.reason, progress.__cause__
            if isinstance(cause, urls.RemoteRefused):
                raise cause.user_error() from None  # retrying a 403 or a 404 cannot help
            failures += 1
            if urls.is_local(url) or failures > urls.RETRIES:
                break
            time.sleep(urls.BACKOFF_S * 2 ** (failures - 1))
        if isinstance(cause, urls.RemoteUnavailable):
            raise urls.unreachable(url, failures, started, reason)  # the server, not the shard: never skipped
        tries = "" if urls.is_local(url) else f" after {failures} attempt(s)"
        if self.bad_shard == "error":
            raise UserError(f"shard {seg.shard.path} is unreadable{tries} ({reason}) at {url}; {self.advice}")
        for index in range(seg.first + done, seg.stop):
            yield Item(seg.shard.path, f"#{index}", None, f"bad shard: {reason}")
            done += 1

    @staticmethod
    def _read(url: str, seg: Segment, done: int) -> Iterator[Item]:
        start = seg.first + done
        index = start - 1
        offsets = seg.shard.offsets
        span = None if offsets is None else (offsets[start], offsets[seg.stop])
        try:
            for index, sample in enumerate(tar_samples(url, start, span), start=start):
                if index >= seg.stop:
                    return
                files = {k: v for k, v in sample.items() if not k.startswith("__")}
                yield Item(seg.shard.path, sample["__key__"], files)
                done += 1
            if index + 1 < seg.stop:
                raise ShardError(f"ends after {index + 1} samples, the manifest says {seg.shard.count}")
        except (ShardError, tarfile.TarError, *urls.REMOTE_ERRORS) as exc:
            raise _Progress(done, f"{type(exc).__name__}: {urls.first_line(exc)}") from exc


class _Progress(Exception):
    """A read stopped after ``done`` samples of a segment, for ``reason``."""

    def __init__(self, done: int, reason: str) -> None:
        super().__init__(reason)
        self.done, self.reason = done, reason


def _download(url: str, dest: Path) -> str:
    """Stream ``url`` into ``dest``; returns its sha256."""
    digest = hashlib.sha256()
    stream = urls.open_stream(url)
    try:
        with open(dest, "wb") as out:
            while block := stream.read(1 << 20):
                digest.update(block)
                out.write(block)
    finally:
        stream.close()
    return digest.hexdigest()


def decode(item: Item, delta: dict[str, Any], corrupt: str) -> tuple[Image.Image, int] | None:
    """Decode one sample; a corrupt one is counted and skipped (or raises under ``corrupt='error'``)."""
    reason = item.error
    if reason is None:
        try:
            ext = next(e for e in IMAGE_EXTS if e in item.files)
            label = int(item.files["cls"])
            return open_rgb(item.files[ext]), label
        except (StopIteration, KeyError, ValueError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
    if corrupt == "error":
        raise UserError(f"corrupt sample {item.key} in shard {item.shard} ({reason}); pass corrupt='skip' to skip it")
    delta["corrupt"] += 1
    if len(delta["corrupt_keys"]) < _MAX_KEYS_KEPT:
        delta["corrupt_keys"].append(f"{item.shard}:{item.key}")
    return None


def check_policy(name: str, value: str) -> None:
    """UserError unless ``value`` is one of the shard policies (``skip``, ``error``)."""
    if value not in POLICIES:
        raise UserError(f"{name} must be one of {', '.join(POLICIES)} (got {value!r})")


def usable_shards(
    location: str, shards: list[ShardInfo], bad_shard: str, bad: list[str], advice: str
) -> list[ShardInfo]:
    """Existence and size of every local shard (no hashing); bad ones raise (with ``advice``, see
    :func:`repair_advice`) or are listed in ``bad`` and left out."""
    usable = []
    for shard in shards:
        problem = shard_problem(location, shard)
        if problem is None:
            usable.append(shard)
            continue
        if bad_shard == "error":
            where = urls.join(location, shard.path)
            raise UserError(f"shard {shard.path} is unreadable ({problem}) at {where}; {advice}")
        bad.append(shard.path)
        log_warning(f"warning: skipping shard {shard.path} ({problem}) under bad_shard='skip'")
    return usable


