"""segan.data.fetch against a real HTTP server on 127.0.0.1 (no mocks).

``FileServer`` is also used by test_valentini.py: it serves in-memory files, records every
request (path and Range header), honours ``Range: bytes=N-`` (206/416) unless told not to,
and can be told to misbehave on the next requests for a file: drop the connection halfway
through the body, answer an HTTP error status, or stall.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from segan.data.fetch import ChecksumError, DownloadError, download, file_md5_matches, md5_file


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        owner: FileServer = self.server.owner  # type: ignore[attr-defined]
        name = urlsplit(self.path).path.rsplit("/", 1)[-1]
        range_header = self.headers.get("Range")
        with owner.lock:
            owner.requests.append({"name": name, "path": self.path, "range": range_header})
            faults = owner.faults.get(name, [])
            fault = faults.pop(0) if faults else None
        body = owner.files.get(name)
        if body is None:
            return self._error(404)
        if isinstance(fault, int):
            return self._error(fault)
        if isinstance(fault, tuple) and fault[0] == "sleep":
            time.sleep(fault[1])
        start = 0
        if range_header and owner.honor_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Content-Type", "application/zip")
        self.end_headers()
        if fault == "drop":
            # Announce the full length, send half, then hang up: a truncated transfer.
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (timeout and retry tests)

    def _error(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


class FileServer:
    """A threaded HTTP server on a free loopback port serving ``files`` by base name."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.faults: dict[str, list] = {}
        self.honor_range = True
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/bitstream/handle/10283/2791"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}?sequence=1&isAllowed=y"

    def requests_for(self, name: str) -> list[dict]:
        return [r for r in self.requests if r["name"] == name]

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


PAYLOAD = os.urandom(300_000)  # > several read chunks, so resuming happens mid-stream
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
FAST = {"retries": 3, "timeout_s": 5.0, "progress": False, "backoff_s": 0.01}


def test_download_verifies_and_leaves_no_partial(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    dest = tmp_path / "cache" / "a.zip"
    assert download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("a.zip.part").exists()
    assert dest.with_name("a.zip.md5ok").exists()
    assert server.requests_for("a.zip")[0]["range"] is None


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    server.faults["a.zip"] = ["drop"]
    dest = tmp_path / "a.zip"
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    reqs = server.requests_for("a.zip")
    assert len(reqs) == 2
    assert reqs[0]["range"] is None
    assert reqs[1]["range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert md5_file(dest) == PAYLOAD_MD5


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    server.faults["a.zip"] = ["drop"]
    server.honor_range = False
    dest = tmp_path / "a.zip"
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    assert server.requests_for("a.zip")[1]["range"] is not None  # asked, got a 200 with everything
    assert md5_file(dest) == PAYLOAD_MD5


def test_416_with_complete_partial_is_finalised(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    dest = tmp_path / "a.zip"
    dest.with_name("a.zip.part").write_bytes(PAYLOAD)  # crashed after the last byte, before the rename
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]
    assert md5_file(dest) == PAYLOAD_MD5


def test_416_with_oversized_partial_restarts(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    dest = tmp_path / "a.zip"
    dest.with_name("a.zip.part").write_bytes(PAYLOAD + b"stale junk")
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD) + 10}-", None]
    assert md5_file(dest) == PAYLOAD_MD5


def test_wrong_md5_is_a_clear_error_and_deletes_the_file(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    dest = tmp_path / "a.zip"
    wrong = "0" * 32
    url = server.url("a.zip")
    with pytest.raises(ChecksumError) as info:
        download(url, dest, wrong, **FAST)
    msg = str(info.value)
    for part in (url, str(dest), wrong, PAYLOAD_MD5):
        assert part in msg
    assert list(tmp_path.iterdir()) == []


def test_verified_file_is_never_fetched_again(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    dest = tmp_path / "a.zip"
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)  # marker hit
    dest.with_name("a.zip.md5ok").unlink()
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)  # re-hash, still no request
    assert len(server.requests) == 1
    assert dest.with_name("a.zip.md5ok").exists()


def test_changed_file_at_dest_is_refetched(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    dest = tmp_path / "a.zip"
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    dest.write_bytes(b"corrupted")  # size/mtime change invalidates the marker
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    assert len(server.requests) == 2
    assert md5_file(dest) == PAYLOAD_MD5


def test_marker_requires_same_size_and_mtime(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    good = hashlib.md5(b"hello").hexdigest()
    assert file_md5_matches(f, good) == (True, good)
    f.write_bytes(b"HELLO")
    ok, actual = file_md5_matches(f, good)
    assert not ok and actual == hashlib.md5(b"HELLO").hexdigest()


def test_5xx_is_retried_then_succeeds(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    server.faults["a.zip"] = [503, 500]
    dest = tmp_path / "a.zip"
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **FAST)
    assert len(server.requests) == 3
    assert md5_file(dest) == PAYLOAD_MD5


def test_retries_exhausted_names_url_and_keeps_partial(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    server.faults["a.zip"] = ["drop", 503, 503]
    dest = tmp_path / "a.zip"
    url = server.url("a.zip")
    with pytest.raises(DownloadError, match="3 attempt") as info:
        download(url, dest, PAYLOAD_MD5, **{**FAST, "retries": 2})
    assert url in str(info.value)
    assert dest.with_name("a.zip.part").stat().st_size == len(PAYLOAD) // 2
    download(url, dest, PAYLOAD_MD5, **FAST)  # a later run resumes
    assert server.requests[-1]["range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert md5_file(dest) == PAYLOAD_MD5


def test_404_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("missing.zip"), tmp_path / "m.zip", None, **FAST)
    assert len(server.requests) == 1


def test_timeout_is_retried(server, tmp_path):
    server.files["a.zip"] = PAYLOAD
    server.faults["a.zip"] = [("sleep", 1.5)]
    dest = tmp_path / "a.zip"
    download(server.url("a.zip"), dest, PAYLOAD_MD5, **{**FAST, "timeout_s": 0.3})
    assert len(server.requests) >= 2
    assert md5_file(dest) == PAYLOAD_MD5


def test_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.zip"
    with pytest.raises(DownloadError, match="cannot connect") as info:
        download(url, tmp_path / "a.zip", None, **{**FAST, "retries": 1})
    assert url in str(info.value)


def test_no_md5_accepts_existing_file(server, tmp_path):
    dest = tmp_path / "a.zip"
    dest.write_bytes(b"user supplied")
    assert download(server.url("a.zip"), dest, None, **FAST) == dest
    assert server.requests == []
