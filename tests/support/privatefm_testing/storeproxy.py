"""A TCP proxy on loopback in front of the S3 server that can cut an upload in the middle.

Everything is forwarded byte for byte (SigV4 signs the Host the client used, which is the proxy's,
so signatures hold). Once armed with a pattern, the first request whose request line matches it
has its headers and half of its body forwarded, and the rest held back: the S3 server has started
that upload and cannot finish it. A test then kills the store, which ends the connection; the
client sees it break mid-request, as when a store crashes mid-upload.

HTTP/1.1 clients (botocore) send a request only after the previous response, and its headers in
one write, so a request line starts a chunk the proxy receives; that is where it looks.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field

_HEADERS_END = b"\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


@dataclass
class Cut:
    """The request that was cut: its request line, its body's length and how much of it went on."""
    request_line: str = ""
    body_bytes: int = 0
    forwarded: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class StoreProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.pattern: re.Pattern[bytes] | None = None
        self.cut = Cut()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.stopped = threading.Event()

    def start(self) -> StoreProxy:
        threading.Thread(target=self._accept, name="store-proxy", daemon=True).start()
        return self

    def arm(self, pattern: bytes) -> Cut:
        """Cuts the first request whose request line matches ``pattern`` (a regex) from now on."""
        with self.lock:
            self.pattern, self.cut = re.compile(pattern), Cut()
            return self.cut

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self.lock:
            for sock in list(self.sockets):
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:  # the store is down: the client sees its connection closed
            client.close()
            return
        server.settimeout(None)
        with self.lock:
            self.sockets |= {client, server}
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
        self._pump(client, server, True)

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        """Copies ``source`` to ``sink`` until either ends; on the request side it may cut."""
        budget: int | None = None  # body bytes still to forward of the request being cut
        try:
            while chunk := source.recv(65536):
                if requests and budget is None:
                    budget = self._maybe_cut(chunk)
                    if budget is not None:
                        end = chunk.find(_HEADERS_END) + len(_HEADERS_END)
                        sink.sendall(chunk[:end])
                        chunk = chunk[end:]
                if budget is not None:
                    sink.sendall(chunk[:budget])
                    self.cut.forwarded += min(len(chunk), budget)
                    budget -= min(len(chunk), budget)
                    if budget == 0:
                        self.cut.done.set()
                        self.stopped.wait()  # held: the rest never goes on; the store's end closes it
                        return
                    continue
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
            with self.lock:
                self.sockets -= {source, sink}

    def _maybe_cut(self, chunk: bytes) -> int | None:
        """How many body bytes of this request to forward when it is the one to cut, else None."""
        with self.lock:
            if self.pattern is None or self.cut.request_line:
                return None
            line = chunk.split(b"\r\n", 1)[0]
            length = _LENGTH.search(chunk)
            if not self.pattern.search(line) or _HEADERS_END not in chunk or not length or int(length[1]) < 2:
                return None
            self.cut.request_line, self.cut.body_bytes = line.decode(errors="replace"), int(length[1])
            return int(length[1]) // 2
