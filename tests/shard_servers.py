"""Servers the URL tests start on 127.0.0.1: a static HTTP server (optionally cutting shard downloads short) and
an S3-compatible moto server."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    """Serves ``directory``; the first ``server.drops`` GETs of a .tar send half the body, then close; the first
    ``server.unavailable`` GETs of a .tar answer 503; while ``server.gone`` is set, a .tar GET is closed unanswered
    (a server that went away behind its load balancer)."""

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
        if not drop:
            return super().do_GET()
        data = Path(self.directory, self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)


@contextlib.contextmanager
def http_server(root: Path, drops: int = 0) -> Iterator[ThreadingHTTPServer]:
    """Serve ``root`` at ``server.url``; ``server.requests`` lists the paths asked for; ``server.drops`` shard
    downloads are cut in the middle (then served normally)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.daemon_threads = True
    server.lock, server.requests, server.drops = threading.Lock(), [], drops
    server.unavailable, server.gone = 0, False
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
