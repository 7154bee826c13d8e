"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server of loopback_s3.py).

Every request is forwarded to the endpoint, except that a request drawn from a seeded RNG at `rate` gets a
transient fault, as a throttled or flaky object store gives them; the kinds (`FAULTS`) take turns, so that any
four faults include one of each:

- "slowdown": 503 with S3's XML error body, Code SlowDown (not forwarded);
- "internal": 500 with Code InternalError (not forwarded);
- "reset": forwarded, then the status line, the headers and half the body are sent and the connection is
  closed with a TCP RST (SO_LINGER 0); a response without a body (a PUT's) is cut inside its headers;
- "stall": a pause of `stall_seconds` before the request is forwarded and answered normally (at most
  `max_stalls` of them, so that a test's time stays bounded).

`force_first` gives the first request of each of those kinds (e.g. "LIST", "GET object", "PUT object") a
fault too, so that a short run is sure to meet faults on its listings, reads and writes. `deny(path)` answers
every request for `path` with a permanent 403 AccessDenied (not forwarded, not counted as a fault).

Counts: `requests` (by `loopback_s3.request_kind`), `faults` (by (fault, kind)), `retries` (requests repeating
the method, path and query of a request that got a fault other than a stall), and `unanswered`: faulted
requests that no later request repeated (a fault a client gave up on, or one it never retried).
"""

from __future__ import annotations

import http.client
import itertools
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from loopback_s3 import Request, request_kind

FAULTS = ("slowdown", "internal", "reset", "stall")
_ERROR = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
          "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
          "denied": (403, "AccessDenied", "Access Denied")}
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own; the body is re-sent with a Content-Length.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """The proxy on 127.0.0.1:<free port>, serving from threads of this process; `url` is its endpoint."""

    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0, faults: tuple[str, ...] = FAULTS,
                 stall_seconds: float = 2.0, max_stalls: int = 3, force_first: tuple[str, ...] = ()):
        self.upstream = urlsplit(upstream).netloc
        self.rate, self.faults, self.stall_seconds, self.max_stalls = rate, faults, stall_seconds, max_stalls
        self.requests: Counter[str] = Counter()
        self.injected: Counter[tuple[str, str]] = Counter()
        self.retries = 0
        self._random = random.Random(seed)
        self._turns = itertools.cycle(faults)
        self._force = set(force_first)
        self._denied: set[str] = set()
        self._outstanding: set[tuple[str, str]] = set()  # (method, path?query) of faulted requests not yet repeated
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def deny(self, path: str) -> None:
        """Answer every request for `path` ("/bucket/key") with 403 AccessDenied from now on."""
        with self._lock:
            self._denied.add(path)

    @property
    def unanswered(self) -> set[tuple[str, str]]:
        with self._lock:
            return set(self._outstanding)

    def faults_by_kind(self) -> dict[str, int]:
        """Faults injected, by fault ("slowdown", ...), summed over request kinds."""
        totals: Counter[str] = Counter()
        for (fault, _), n in self.injected.items():
            totals[fault] += n
        return dict(totals)

    def faulted_kinds(self) -> set[str]:
        """Request kinds that met at least one fault."""
        return {kind for _, kind in self.injected}

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.injected.clear()
            self.retries = 0
            self._outstanding.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _decide(self, method: str, target: str) -> str | None:
        """Count the request and draw its fault (None: forward it as it is)."""
        path, _, query = target.partition("?")
        kind = request_kind(Request(time.time(), method, path, query, ""))
        with self._lock:
            self.requests[kind] += 1
            key = (method, target)
            if key in self._outstanding:
                self.retries += 1
                self._outstanding.discard(key)
            if path in self._denied:
                return "denied"
            forced = kind in self._force
            self._force.discard(kind)
            if not (self._random.random() < self.rate or forced):
                return None
            fault = next(self._turns)
            if fault == "stall" and sum(n for (f, _), n in self.injected.items() if f == "stall") >= self.max_stalls:
                fault = next(self._turns)
                if fault == "stall":  # stalls only, and all spent
                    return None
            if fault != "stall":
                self._outstanding.add(key)
            self.injected[(fault, kind)] += 1
            return fault


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # quiet: the test prints the counts
            pass

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy._decide(self.command, self.path)
            if fault in _ERROR:
                return self._error(*_ERROR[fault])
            if fault == "stall":
                time.sleep(proxy.stall_seconds)
            status, reason, headers, payload = self._forward(body)
            head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
            wire = head.encode("latin-1") + payload
            if fault == "reset":
                cut = len(head) + len(payload) // 2 if payload else len(head) // 2
                return self._reset(wire[:cut])
            self.wfile.write(wire)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            finally:
                connection.close()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command != "HEAD":  # a HEAD's Content-Length is the object's size: keep it
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(payload))))
            return response.status, response.reason, headers, payload

        def _error(self, status: int, code: str, message: str) -> None:
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<Resource>{self.path.partition('?')[0]}</Resource><RequestId>fault-proxy</RequestId></Error>")
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body.encode())

        def _reset(self, partial: bytes) -> None:
            self.wfile.write(partial)
            self.wfile.flush()
            # SO_LINGER on with a zero timeout: close() sends RST, not FIN, as a crashed peer or middlebox does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

    return Handler
