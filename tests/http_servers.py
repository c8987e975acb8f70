"""Real HTTP servers on 127.0.0.1 for tests and benchmarks.

A :class:`LoopbackServer` runs ``http.server`` in threads and answers each request with what a
*behaviour* function returns: a :class:`Reply`, :data:`HANG` (keep the connection open and never
answer, until the server stops) or :data:`CLOSE` (drop the connection without answering). It
records every request. Used as a context manager it leaves no thread and no socket behind: on
exit it releases hanging handlers, shuts down open connections and joins every thread.

::

    with LoopbackServer(healthy_after(1.5)) as server:
        ...probe server.url("/healthz")...

Behaviours: :func:`healthy_after`, :func:`statuses`, :func:`always`, :func:`redirect`, and
:class:`Switch` (healthy when a test says so, for latency measurements).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Request:
    """One request the server received."""

    method: str
    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    body: bytes
    #: ``time.monotonic()`` when it arrived.
    at: float


@dataclass
class Reply:
    """What to answer."""

    status: int = 200
    body: bytes | str = b"ok"
    headers: dict[str, str] = field(default_factory=dict)


#: Answer nothing and keep the connection open until the server stops.
HANG: Any = object()
#: Close the connection without answering.
CLOSE: Any = object()

_Behaviour = Callable[[Request], Any]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real services
    # One write per response and no Nagle delay, like real servers: http.server's default
    # (headers and body in two unbuffered writes) meets the client's delayed ACK: +40 ms each.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        if self.server.tls is not None:
            try:
                self.request = self.server.tls.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.server.tls_errors.append(str(exc))
                self.request.close()
                raise _Dropped from None
            with self.server.lock:
                self.server.connections.add(self.request)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.lock:
                self.server.connections.discard(self.request)
            if self.server.tls is not None:  # socketserver closes only the unwrapped socket
                self.request.close()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(
            self.command,
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
            body,
            time.monotonic(),
        )
        srv = self.server
        with srv.lock:
            srv.requests.append(req)
        reply = srv.behaviour(req)
        if reply is HANG:
            srv.release.wait()
            self.close_connection = True
            return
        if reply is CLOSE:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if isinstance(reply, int):
            reply = Reply(reply)
        payload = reply.body.encode() if isinstance(reply.body, str) else reply.body
        if reply.status in (204, 304) or reply.status < 200:
            payload = b""  # these answers have no body
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _Dropped(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread

    def __init__(self, behaviour: _Behaviour, tls: ssl.SSLContext | None) -> None:
        self.behaviour = behaviour
        self.tls = tls
        self.tls_errors: list[str] = []
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.connections: set[socket.socket] = set()
        self.accepted = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
            self.accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped connections are part of the tests


class LoopbackServer:
    """An HTTP(S) server on 127.0.0.1 answering with ``behaviour(request)``; see module doc."""

    def __init__(self, behaviour: _Behaviour, *, tls: ssl.SSLContext | None = None) -> None:
        self._server = _Server(behaviour, tls)
        self._thread: threading.Thread | None = None
        self.scheme = "https" if tls is not None else "http"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base + path

    @property
    def requests(self) -> list[Request]:
        with self._server.lock:
            return list(self._server.requests)

    @property
    def connections_opened(self) -> int:
        """How many connections the server accepted."""
        return self._server.accepted

    @property
    def tls_errors(self) -> list[str]:
        return list(self._server.tls_errors)

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        srv = self._server
        srv.release.set()
        if self._thread is not None:
            srv.shutdown()
            self._thread.join()
        with srv.lock:
            conns = list(srv.connections)
        for conn in conns:  # idle keep-alive connections: wake their handler threads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        srv.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- behaviours -----------------------------------------------------------------------------------


def always(reply: Any) -> _Behaviour:
    """Answer every request the same way (a :class:`Reply`, a status, HANG or CLOSE)."""
    return lambda _req: reply


def healthy_after(seconds: float, *, body: str = "ok") -> _Behaviour:
    """503 with a short reason until ``seconds`` after the first request, then 200 ``body``.

    Counting from the first request (not from now) keeps tests independent of how long the
    setup before it took.
    """
    lock = threading.Lock()
    first: list[float] = []

    def behaviour(_req: Request) -> Reply:
        now = time.monotonic()
        with lock:
            if not first:
                first.append(now)
        if now >= first[0] + seconds:
            return Reply(200, body)
        return Reply(503, "starting: database migrations are running")

    return behaviour


def statuses(*sequence: int | Reply, then: int | Reply = 200) -> _Behaviour:
    """Answer with each of ``sequence`` in turn, then always ``then``."""
    pending = list(sequence)
    lock = threading.Lock()

    def behaviour(_req: Request) -> Any:
        with lock:
            item = pending.pop(0) if pending else then
        return Reply(item, f"status {item}") if isinstance(item, int) else item

    return behaviour


def redirect(location: str, *, target: str = "/") -> _Behaviour:
    """302 to ``location`` for every path except ``target``, which answers 200 "landed"."""

    def behaviour(req: Request) -> Reply:
        if req.path == target:
            return Reply(200, "landed")
        return Reply(302, "moved", {"Location": location})

    return behaviour


class Switch:
    """A behaviour answering 503 until :meth:`turn_healthy` is called, then 200.

    ``healthy_since`` is the ``time.monotonic()`` of the switch, for latency measurements.
    """

    def __init__(self) -> None:
        self.healthy_since: float | None = None

    def turn_healthy(self, at: float | None = None) -> None:
        self.healthy_since = time.monotonic() if at is None else at

    def __call__(self, _req: Request) -> Reply:
        since = self.healthy_since
        if since is not None and time.monotonic() >= since:
            return Reply(200, "ok")
        return Reply(503, "not yet")


def unused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_pair(hostnames: Iterable[str] = ("127.0.0.1", "localhost")) -> tuple[Any, ssl.SSLContext]:
    """A test CA (``trustme``) and a server context with a certificate it issued."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(*hostnames)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ca, ctx


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Every test leaves no thread behind (servers, clients, sink workers).

    Autouse in each test module that imports it by name.
    """
    before = set(threading.enumerate())
    yield
    end = time.monotonic() + 10
    while time.monotonic() < end:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left:
            return
        time.sleep(0.02)
    raise AssertionError(f"threads left behind: {left}")
