"""A real S3 endpoint on loopback: moto's S3 app served over HTTP on 127.0.0.1 (as
`moto.server.ThreadedMotoServer` serves it), recording every request it answers. Used by the suite's
fixtures (conftest.py) and by benchmarks/score_scale.py, which counts a scoring run's requests."""

from __future__ import annotations

import socket
import threading
import time
from typing import NamedTuple


class Request(NamedTuple):
    time: float  # when the server received it (time.time())
    method: str
    path: str  # path-style: /bucket/key
    query: str
    range: str  # the Range header of a ranged GET ("bytes=0-65535"), else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_kind(request: Request) -> str:
    """LIST, "create bucket", or "<METHOD> object" / "<METHOD> bucket"."""
    is_bucket = request.path.strip("/").count("/") == 0
    if request.method == "GET" and "list-type" in request.query:
        return "LIST"
    if request.method == "PUT" and is_bucket:
        return "create bucket"
    return f"{request.method} {'bucket' if is_bucket else 'object'}"


class LoopbackS3:
    """moto's S3 on 127.0.0.1:<free port> in a thread of this process; `url` is its endpoint, `requests`
    the `Request`s answered so far."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[Request] = []
        self._lock = threading.Lock()

        def counting(environ, start_response):
            with self._lock:
                self.requests.append(Request(time.time(), environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                             environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE", "")))
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", free_port(), counting, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def take(self) -> list[Request]:
        """The requests recorded since the last call, and start afresh."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
