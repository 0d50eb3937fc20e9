"""A fault-injecting HTTP proxy on loopback, for putting in front of an S3 server (moto) in tests.

Every request is first shown to a *plan*: a callable that gets the request (`Request`) and returns a fault
kind, or None to forward it untouched. The kinds, each what S3 (or the network to it) really does:

  before forwarding (the server never sees the request):
    "500"         500 InternalError (S3's XML error body)
    "503"         503 ServiceUnavailable
    "slowdown"    503 SlowDown: S3's throttle ("Please reduce your request rate.")
    "409"         409 ConditionalRequestConflict: a concurrent conditional write was in flight
    "drop"        the connection is closed without a reply
  after forwarding (the server did the work, the client does not learn of it):
    "drop-after"  the reply is lost: the connection is closed instead
    "500-after"   the reply is replaced by a 500 InternalError
    "truncate"    the status and headers arrive, then the connection closes halfway through the body

`seeded_plan(seed, rate, kinds)` draws faults from a seeded generator; a plan is any function, so tests also
script exact sequences (and run code between two requests: the plan is called before each forward).

moto checks If-None-Match and then stores, without a lock, so two concurrent conditional PUTs of one key can
both succeed there; S3 decides them atomically. The proxy forwards conditional PUTs one at a time, which gives
moto S3's guarantee, so that a test of concurrent writers tests the client, not moto's race.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

BEFORE = ("500", "503", "slowdown", "409", "drop")
AFTER = ("drop-after", "500-after", "truncate")
KINDS = BEFORE + AFTER

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "500-after": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "409": (409, "ConditionalRequestConflict", "A conflicting operation occurred. Please retry."),
}
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy sets itself.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect",
        "content-length"}


@dataclass(frozen=True)
class Request:
    n: int  # 0-based arrival number
    method: str
    path: str  # path and query, as sent
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)

    @property
    def key(self) -> str:
        """The object key (for path-style requests: the path after the bucket), without the query."""
        parts = urlsplit(self.path).path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def query(self) -> str:
        return urlsplit(self.path).query

    @property
    def conditional(self) -> bool:
        return any(name.lower() == "if-none-match" for name in self.headers)

    @property
    def attempt(self) -> int:
        """botocore's attempt number of this request (header amz-sdk-request: [ttl=T; ]attempt=N; max=M), else 1."""
        header = next((v for k, v in self.headers.items() if k.lower() == "amz-sdk-request"), "")
        found = re.search(r"\battempt=(\d+)", header)
        return int(found.group(1)) if found else 1


Plan = Callable[[Request], "str | None"]


def seeded_plan(seed: int, rate: float, kinds: Iterable[str] = KINDS) -> Plan:
    """Fault a request with probability `rate`, the kind drawn uniformly from `kinds` (seeded: one draw per
    request, so a sequential client meets the same faults on every run). "truncate" only hits GETs (the other
    replies have no body to cut), "409" only conditional PUTs (S3 answers it to nothing else)."""
    rng = random.Random(seed)  # noqa: S311 - fault schedule, not security
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"fault kinds {kinds!r}: some of {', '.join(KINDS)} wanted")
    lock = threading.Lock()

    def plan(request: Request) -> str | None:
        with lock:
            hit, kind = rng.random() < rate, rng.choice(kinds)
        if not hit or (kind == "truncate" and request.method != "GET"):
            return None
        if kind == "409" and not (request.method == "PUT" and request.conditional):
            return None
        return kind

    return plan


class S3FaultProxy:
    """Threaded proxy: http://127.0.0.1:PORT -> upstream. `injected` counts the faults by kind, `requests`
    logs (Request, fault) pairs, `forwarded` counts the requests the upstream saw."""

    def __init__(self, upstream: str, plan: Plan | None = None):
        parsed = urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.plan: Plan = plan or (lambda request: None)
        self.injected: Counter = Counter()
        self.requests: list[tuple[Request, str | None]] = []
        self.forwarded = 0
        self._lock = threading.Lock()
        self._conditional = threading.Lock()  # one conditional PUT at a time (see the module's docstring)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; also answers Expect: 100-continue
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._handle(self)

            do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def faults(self) -> int:
        return sum(self.injected.values())

    # -- one request ---------------------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        with self._lock:
            n = len(self.requests)
        request = Request(n, handler.command, handler.path, {k: v for k, v in handler.headers.items()}, body)
        kind = self.plan(request)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self.requests.append((request, kind))
            if kind:
                self.injected[kind] += 1
        if kind == "drop":
            return _drop(handler)
        if kind in _ERRORS and kind in BEFORE:
            return _send_error(handler, kind, n)
        status, headers, payload = self._forward(request)
        with self._lock:
            self.forwarded += 1
        if kind == "drop-after":
            return _drop(handler)
        if kind == "500-after":
            return _send_error(handler, kind, n)
        handler.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP:
                handler.send_header(name, value)
        length = headers_length(headers) if request.method == "HEAD" else len(payload)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        if request.method == "HEAD":
            return None
        if kind == "truncate" and len(payload) > 1:
            handler.wfile.write(payload[: len(payload) // 2])
            handler.wfile.flush()
            return _drop(handler)
        handler.wfile.write(payload)
        return None

    def _forward(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        if request.method == "PUT" and request.conditional:
            with self._conditional:
                return self._send_upstream(request)
        return self._send_upstream(request)

    def _send_upstream(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(request.body))
            conn.request(request.method, request.path, body=request.body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()


def headers_length(headers: list[tuple[str, str]]) -> int:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value)
    return 0


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _send_error(handler: BaseHTTPRequestHandler, kind: str, n: int) -> None:
    status, code, message = _ERRORS[kind]
    payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<RequestId>fault-{n}</RequestId></Error>").encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", str(len(payload)) if handler.command != "HEAD" else "0")
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(payload)


def _drop(handler: BaseHTTPRequestHandler) -> None:
    """Close the connection at once, without (the rest of) a reply."""
    handler.close_connection = True
    try:
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
