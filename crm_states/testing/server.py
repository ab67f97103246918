"""A generic loopback HTTP(S) server for CRM fakes: routes, request counters and fault injection.

Fakes (``FakeSalesforce``, ``FakeNationbuilder``) subclass ``LoopbackServer`` so tests talk real HTTP
to 127.0.0.1 instead of patching ``requests``. Nothing here knows a CRM.

API::

    server = LoopbackServer(tls=False, faults=Faults())
    server.route("GET", r"/people/(?P<id>\\d+)", handler, kind="get_person")
    with server:                       # .start() / .stop() also work
        server.url                     # "http://127.0.0.1:PORT" ("https://..." with tls=True)
        server.ca_cert_path            # PEM of the throwaway trustme CA (tls=True): requests' verify=
        server.client_session()        # a requests.Session trusting that CA (trust_env off, see there)
        server.inject(Fault.error(503), times=2)          # the next 2 requests answer 503
        server.inject(Fault.drop(), kind="get_person")    # drop the next get_person connection
        server.inject(Fault.slow(2.0))                    # answer the next request 2 s late
        server.inject(Fault.malformed_json())             # answer the next request with broken JSON
        server.faults = Faults(seed=1, error_rates={503: 0.1})  # seeded random faults from now on
        server.counts["get_person"], server.total_requests

Handlers take ``(request: Request, match: re.Match)`` and return a ``Reply`` (or a plain
``(status, headers, body)`` tuple). ``request.path`` is the path as received (still percent-encoded):
unquote captured groups. Routes are tried in the order they were added; the first match wins and
names the counter ("unmatched" answers 404). Queued faults go first-in first-out and win over the
random ones; ``processed=True`` runs the handler (its side effects happen) before the fault spoils the
answer, which is how to model "the server did it but the client never heard". Subclasses may
override ``admit`` (auth and quota checks before the route runs), ``fault_reply`` (the body of an
injected error status) and ``finish_reply`` (headers added to every answer). ``call(request)`` runs a
route directly (no counting, faults or ``admit``), for batch endpoints that dispatch sub-requests.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import random
import re
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import requests

from .faults import Fault, Faults

__all__ = ["LoopbackServer", "Request", "Reply", "json_reply", "Fault", "Faults", "Handler"]

log = logging.getLogger("crm_states.testing")


@attrs.frozen
class Request:
    """One HTTP request as the server saw it. Header names are lower-cased."""

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def param(self, name: str) -> str | None:
        """The first value of a query parameter, decoded."""
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode("utf-8"), keep_blank_values=True).items()}


@attrs.frozen
class Reply:
    status: int
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""


def json_reply(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Reply:
    """A JSON answer with the right content type."""
    return Reply(status, {"Content-Type": "application/json;charset=UTF-8", **(headers or {})},
                 json.dumps(payload).encode("utf-8"))


Handler = Callable[[Request, "re.Match[str]"], "Reply | tuple[int, Mapping[str, str], bytes]"]
_DROP = object()
_MALFORMED = b'{"truncated": [1, 2'


class LoopbackServer:
    """A threaded HTTP(S) server on 127.0.0.1 with an ephemeral port. See the module docstring."""

    def __init__(self, *, tls: bool = False, faults: Faults | None = None) -> None:
        self.tls = tls
        self._routes: list[tuple[str, re.Pattern[str], Handler, str]] = []
        self._lock = threading.Lock()
        self._queue: collections.deque[list[Any]] = collections.deque()  # [fault, times_left, kind]
        self.counts: collections.Counter[str] = collections.Counter()
        self.fault_counts: collections.Counter[str] = collections.Counter()
        self.faults = faults or Faults()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.ca_cert_path: str | None = None

    # -- configuration -------------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        """Replace the random faults; the generator restarts from ``faults.seed``."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)

    def route(self, method: str, pattern: str, handler: Handler, *, kind: str) -> None:
        """Answer ``method`` requests whose whole path matches ``pattern`` with ``handler``."""
        self._routes.append((method.upper(), re.compile(pattern), handler, kind))

    def inject(self, fault: Fault, times: int = 1, *, kind: str | None = None) -> None:
        """Spoil the next ``times`` requests (of route ``kind`` only, when given) with ``fault``."""
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._queue.append([fault, times, kind])

    def clear_faults(self) -> None:
        """Forget queued faults and random rates."""
        with self._lock:
            self._queue.clear()
        self.faults = Faults()

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.fault_counts.clear()

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def start(self) -> LoopbackServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _RequestHandler)
        httpd.owner = self
        if self.tls:
            httpd.ssl_context = self._make_tls_context()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}-{httpd.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
            self.ca_cert_path = None

    def client_session(self) -> requests.Session:
        """A ``requests.Session`` that trusts this server's CA.

        ``trust_env`` is off because ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would otherwise override
        ``session.verify`` (requests applies them whenever a request's own ``verify`` is unset).
        """
        session = requests.Session()
        session.trust_env = False
        if self.ca_cert_path is not None:
            session.verify = self.ca_cert_path
        return session

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_tls_context(self) -> ssl.SSLContext:
        import trustme  # testing extra: only needed for tls=True

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="loopback-ca-")
        path = Path(self._tmpdir.name) / "ca.pem"
        ca.cert_pem.write_to_path(str(path))
        self.ca_cert_path = str(path)
        return context

    # -- hooks for subclasses ------------------------------------------------------------------------

    def fault_reply(self, request: Request, status: int) -> Reply:
        """The answer for an injected error ``status`` that brought no body of its own."""
        return json_reply(status, {"error": f"injected {status}"})

    def admit(self, request: Request, kind: str) -> Reply | None:
        """Gatekeeping before the route runs (auth, quotas): a ``Reply`` here answers instead of it."""
        return None

    def finish_reply(self, request: Request, reply: Reply) -> Reply:
        """Last look at every answer that is sent (not at dropped ones): add headers here."""
        return reply

    # -- dispatch ------------------------------------------------------------------------------------

    def match(self, method: str, path: str) -> tuple[Handler | None, re.Match[str] | None, str]:
        """The handler, match and kind for a request ("unmatched" when no route fits)."""
        for route_method, pattern, handler, kind in self._routes:
            if route_method == method:
                m = pattern.fullmatch(path)
                if m:
                    return handler, m, kind
        return None, None, "unmatched"

    def call(self, request: Request) -> Reply:
        """Run the route for ``request`` without counting or faults (used for sub-requests)."""
        handler, m, _ = self.match(request.method, request.path)
        if handler is None or m is None:
            return json_reply(404, {"error": f"no route for {request.method} {request.path}"})
        try:
            result = handler(request, m)
        except Exception:
            log.exception("loopback handler failed on %s %s", request.method, request.path)
            return json_reply(500, {"error": "handler raised"})
        return result if isinstance(result, Reply) else Reply(*result)

    def _next_fault(self, kind: str) -> Fault | None:
        with self._lock:
            self.counts[kind] += 1
            for entry in self._queue:
                fault, _, only = entry
                if only is None or only == kind:
                    entry[1] -= 1
                    if entry[1] == 0:
                        self._queue.remove(entry)
                    break
            else:
                fault = self._faults.draw(self._rng)
            if fault is not None:
                self.fault_counts[fault.kind] += 1
            return fault

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _serve(self, request: Request) -> Reply | object:
        """The answer for one request, or ``_DROP`` to close the connection without one."""
        _, _, kind = self.match(request.method, request.path)
        fault = self._next_fault(kind)
        self._wait(self.faults.latency)
        if fault is None or fault.kind == "slow":
            if fault is not None:
                self._wait(fault.seconds)
            return self.finish_reply(request, self.admit(request, kind) or self.call(request))
        if fault.processed:
            self.admit(request, kind) or self.call(request)
        if fault.kind == "drop":
            return _DROP
        if fault.kind == "malformed_json":
            reply = Reply(200, {"Content-Type": "application/json;charset=UTF-8"}, _MALFORMED)
        elif fault.body is not None:
            reply = Reply(fault.status, {"Content-Type": "application/json;charset=UTF-8", **fault.headers},
                          fault.body)
        else:
            base = self.fault_reply(request, fault.status)
            reply = attrs.evolve(base, headers={**base.headers, **fault.headers})
        return self.finish_reply(request, reply)


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open connections so ``stop`` can end keep-alive ones instead of waiting for them."""

    daemon_threads = True
    block_on_close = False
    owner: LoopbackServer
    ssl_context: ssl.SSLContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("loopback connection from %s failed", client_address, exc_info=True)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body are separate writes
        if self.ssl_context is not None:  # handshake later, in the handler's thread
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._open_lock:
            self._open.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a CRM would
    server: _HTTPServer
    timeout = 30

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (OSError, ssl.SSLError):
                self.close_connection = True
                raise

    def handle(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            super().handle()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        reply = self.server.owner._serve(request)
        if not isinstance(reply, Reply):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(reply.status)
        headers = {k.lower(): (k, v) for k, v in reply.headers.items()}
        for name, value in headers.values():
            self.send_header(name, value)
        if "content-length" not in headers:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD" and reply.body:
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        log.debug("loopback %s: " + format, self.address_string(), *args)
