"""Servers the URL tests start on 127.0.0.1: a static HTTP server (optionally cutting shard downloads short) and
an S3-compatible moto server."""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    """Serves ``directory``; .tar files are sent here, answering a single ``Range: bytes=A-B`` with 206 when
    ``server.ranges`` (Python's own handler ignores Range); the first ``server.drops`` GETs of a .tar send half the
    body, then close; the first ``server.unavailable`` GETs of a .tar answer 503; while ``server.gone`` is set, a .tar
    GET is closed unanswered (a server that went away behind its load balancer)."""

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def do_GET(self) -> None:  # noqa: N802
        server = self.server
        with server.lock:
            server.requests.append(self.path)
            tar = self.path.endswith(".tar")
            drop, busy = tar and server.drops > 0, tar and server.unavailable > 0
            server.drops -= drop
            server.unavailable -= busy
        if tar and server.gone:
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        if busy:
            return self.send_error(503, "Service Unavailable")
        path = Path(self.directory, self.path.lstrip("/"))
        if not (tar and path.is_file()):
            return super().do_GET()
        data = path.read_bytes()
        span = _byte_range(self.headers.get("Range"), len(data)) if server.ranges else None
        if span is not None and span[0] >= len(data):
            return self.send_error(416)  # Range Not Satisfiable, as real servers answer
        begin, end = span or (0, len(data))
        self.send_response(200 if span is None else 206)
        if span is not None:
            self.send_header("Content-Range", f"bytes {begin}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - begin))
        self.end_headers()
        body = data[begin : (begin + end) // 2 if drop else end]
        with server.lock:
            server.shard_bytes_sent += len(body)
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # a reader that had all it wanted closed the connection (a whole body to a range reader)
            self.close_connection = True
            return
        if drop:
            self.close_connection = True
            self.connection.shutdown(2)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[begin, end)`` of a single ``bytes=A-B`` (or ``A-``) range of a file of ``size``, None without one."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
    if match is None:
        return None
    return int(match[1]), min(int(match[2] or size - 1) + 1, size)


@contextlib.contextmanager
def http_server(root: Path, drops: int = 0, ranges: bool = True) -> Iterator[ThreadingHTTPServer]:
    """Serve ``root`` at ``server.url``; ``server.requests`` lists the paths asked for; ``server.drops`` shard
    downloads are cut in the middle (then served normally); ``ranges=False``: Range headers are ignored (200 and
    the whole file, as ``python -m http.server`` does); ``server.shard_bytes_sent`` counts the .tar bytes sent."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.daemon_threads = True
    server.lock, server.requests, server.drops, server.ranges = threading.Lock(), [], drops, ranges
    server.shard_bytes_sent, server.unavailable, server.gone = 0, 0, False
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server(root: Path, bucket: str, prefix: str) -> Iterator[str]:
    """moto in server mode on 127.0.0.1 holding ``root``'s files under ``s3://bucket/prefix/``; yields the
    endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                              aws_secret_access_key="test")  # fmt: skip
        client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root)}")
        yield endpoint
    finally:
        server.stop()
