"""A real threaded HTTP server on 127.0.0.1 for download tests, with injectable faults.

    from tests.httpserver import HttpServer, http_server  # the fixture

    with HttpServer() as server:
        url = server.add("/f.bin", b"data", faults=[500, "truncate"])
        ...
        assert server.count("/f.bin") == 3

Faults are consumed one per request, then the path is served normally:

* an ``int``: answer with that HTTP status and a short body;
* ``"truncate"``: announce the full Content-Length, send half the body, close;
* ``"reset"``: send half the body, then reset the connection (TCP RST);
* ``"hang"``: wait ``hang`` seconds before answering (for client timeouts).

Permanent behaviour per path: ``status`` (e.g. 404), ``redirect`` (a Location,
e.g. the path itself for a loop), ``trickle`` (seconds between small body
pieces) and ``gate`` (a :class:`threading.Event`: headers are sent, then the
body waits for the event). Unknown paths get 404. Every request is counted
per path (query string ignored).
"""

import collections
import dataclasses
import http.server
import io
import socket
import struct
import threading
import time
from typing import List, Optional

import pytest


@dataclasses.dataclass
class Route:
    body: bytes = b""
    faults: List = dataclasses.field(default_factory=list)
    status: int = 200
    redirect: Optional[str] = None
    trickle: float = 0.0
    gate: Optional[threading.Event] = None
    hang: float = 5.0
    headers: dict = dataclasses.field(default_factory=dict)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "tdx-test"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        owner: "HttpServer" = self.server.owner
        path = self.path.split("?", 1)[0]
        with owner.lock:
            owner.requests[path] += 1
            route = owner.routes.get(path)
            fault = route.faults.pop(0) if route and route.faults else None
        if route is None:
            return self._simple(404)
        if isinstance(fault, int):
            return self._simple(fault)
        if fault == "hang":
            time.sleep(route.hang)
        if route.redirect is not None:
            self.send_response(302)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.status != 200:
            return self._simple(route.status)
        body = route.body
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in route.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if fault in ("truncate", "reset"):
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.wfile.close()
            self.rfile.close()
            self.connection.close()
            self.wfile, self.rfile = io.BytesIO(), io.BytesIO()  # the base class flushes these afterwards
            return
        if route.gate is not None:
            self.wfile.flush()
            route.gate.wait()
        if route.trickle:
            step = max(1, len(body) // 16)
            for start in range(0, len(body), step):
                self.wfile.write(body[start:start + step])
                self.wfile.flush()
                time.sleep(route.trickle)
        else:
            self.wfile.write(body)

    def _simple(self, status):
        body = f"status {status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HttpServer:
    """The server; ``base`` is ``http://127.0.0.1:<port>``. Use as a context manager."""

    def __init__(self):
        self.routes = {}
        self.requests = collections.Counter()
        self.lock = threading.Lock()
        self._server = None
        self._thread = None

    def add(self, path: str, body: bytes = b"", **options) -> str:
        """Serve ``body`` at ``path`` (options: see :class:`Route`); return its URL."""
        with self.lock:
            self.routes[path] = Route(body=body, **options)
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> int:
        with self.lock:
            return self.requests[path]

    def start(self) -> "HttpServer":
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for route in self.routes.values():
            if route.gate is not None:
                route.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def http_server():
    """A running :class:`HttpServer`, stopped after the test."""
    with HttpServer() as server:
        yield server
