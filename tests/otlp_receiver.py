"""A loopback OTLP/HTTP trace receiver for tests: the collector end of ``shipyard[otel]``.

It accepts ``POST /v1/traces`` with an ``ExportTraceServiceRequest`` in protobuf (optionally
gzip- or deflate-compressed), decodes it with the official ``opentelemetry-proto`` package and
keeps every span as a :class:`ReceivedSpan`. It answers 200 with an empty
``ExportTraceServiceResponse``, as a collector does. Dead collectors too: :class:`HangingPort`
accepts connections and never answers, :class:`ClosedPort` refuses them.
"""

from __future__ import annotations

import gzip
import socket
import threading
import zlib
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def _value(v: Any) -> Any:
    """A protobuf ``AnyValue`` as a Python value."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    """One span as the collector received it (ids in lowercase hex)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    #: (name, attributes) of each event, in order.
    events: list[tuple[str, dict[str, Any]]]
    #: 0 unset, 1 ok, 2 error.
    status_code: int
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)
    #: The instrumentation scope's name and version.
    scope: tuple[str, str] = ("", "")
    #: The span's kind (1 internal, 2 server, 3 client, ...).
    kind: int = 0

    @property
    def service(self) -> str | None:
        return self.resource.get("service.name")


class OTLPReceiver:
    """A running receiver on ``127.0.0.1``: ``url`` is what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, request: Any) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                            attributes=_attrs(s.attributes),
                            events=[(e.name, _attrs(e.attributes)) for e in s.events],
                            status_code=s.status.code, status_message=s.status.message,
                            resource=resource, scope=(ss.scope.name, ss.scope.version),
                            kind=s.kind,
                        )
                    )  # fmt: skip
        with self._lock:
            self.requests += 1
            self.spans += spans

    def of_service(self, name: str) -> list[ReceivedSpan]:
        """The spans received so far whose resource's ``service.name`` is ``name``."""
        with self._lock:
            return [s for s in self.spans if s.service == name]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class HangingPort:
    """A port on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._held: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._held.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for conn in self._held:
            conn.close()


class ClosedPort:
    """A loopback port that refuses connections: bound (so no one else takes it), not listening."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()
