"""The chaos tests' store proxy (privatefm_testing.storeproxy), against a real HTTP server on loopback:
it forwards requests byte for byte, and once armed cuts the first matching upload halfway."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from privatefm_testing.storeproxy import StoreProxy


class Upstream:
    """A listening socket that records what each connection sent, answering each complete request."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.received: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with self.lock:
            index = len(self.received)
            self.received.append(b"")
            self.conns.append(conn)
        try:
            while chunk := conn.recv(65536):
                data += chunk
                with self.lock:
                    self.received[index] = data
                head, sep, body = data.partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                if sep and len(body) >= length:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    data = b""
        except OSError:
            pass

    def kill(self) -> None:
        """As when the store dies: its listener and every connection go."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept, so nothing more is taken
        self.listener.close()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.kill()


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[StoreProxy]:
    running = StoreProxy(upstream.address).start()
    yield running
    running.stop()


def put(port: int, path: str, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("PUT", path, body=body)
        return conn.getresponse().status
    finally:
        conn.close()


def test_unarmed_it_forwards_requests_whole(upstream: Upstream, proxy: StoreProxy) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    assert put(port, "/b/learners/x/checkpoints/v1/a.safetensors", b"y" * 200_000) == 200
    (got,) = upstream.received
    assert got.startswith(b"PUT /b/learners/x/checkpoints/v1/a.safetensors HTTP/1.1\r\n")
    assert got.endswith(b"\r\n\r\n" + b"y" * 200_000)


def test_armed_it_cuts_the_first_matching_upload_halfway_and_only_that_one(
        upstream: Upstream, proxy: StoreProxy) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    cut = proxy.arm(rb"^PUT /b/learners/x/checkpoints/v\d+/[^ ?]+\.safetensors[ ?]")
    assert put(port, "/b/learners/x/checkpoints/v1/manifest.json", b"{}") == 200  # does not match
    body = bytes(range(256)) * 400  # 102,400 bytes
    result: list[BaseException | int] = []

    def upload() -> None:
        try:
            result.append(put(port, "/b/learners/x/checkpoints/v2/a.safetensors", body))
        except Exception as err:  # the outcome is what the test looks at
            result.append(err)
    client = threading.Thread(target=upload)
    client.start()
    assert cut.done.wait(5)
    assert cut.request_line == "PUT /b/learners/x/checkpoints/v2/a.safetensors HTTP/1.1"
    assert (cut.body_bytes, cut.forwarded) == (len(body), len(body) // 2)
    # The store has the headers and exactly half the body, and has not answered.
    def received_body() -> bytes:
        with upstream.lock:
            return upstream.received[1].partition(b"\r\n\r\n")[2] if len(upstream.received) > 1 else b""
    deadline = time.monotonic() + 5
    while len(received_body()) < len(body) // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # and nothing more comes
    assert received_body() == body[: len(body) // 2]
    assert not result
    upstream.kill()  # the store dies: the cut request fails, and so does a new one
    client.join(10)
    assert result and isinstance(result[0], (ConnectionError, http.client.HTTPException, OSError)), result
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        put(port, "/b/learners/x/checkpoints/v3/a.safetensors", b"z")

