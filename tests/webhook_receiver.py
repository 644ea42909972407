"""A real HTTP receiver for webhook tests, on 127.0.0.1: it records what it gets and can
answer the first N requests with an error."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    url: str
    # Answer this many requests with ``error_status`` before accepting any.
    fail_first: int = 0
    error_status: int = 500
    received: list[Received] = field(default_factory=list)
    accepted: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, request: Received) -> int:
        with self.lock:
            self.received.append(request)
            if len(self.received) <= self.fail_first:
                return self.error_status
            self.accepted.append(request)
            return 204

    @classmethod
    @contextlib.contextmanager
    def start(cls, *, fail_first: int = 0, error_status: int = 500) -> Iterator[WebhookReceiver]:
        receiver: WebhookReceiver

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = Received(self.path, dict(self.headers.items()), self.rfile.read(length))
                status = receiver.answer(request)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        receiver = cls(
            f"http://127.0.0.1:{server.server_port}/hook",
            fail_first=fail_first,
            error_status=error_status,
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield receiver
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
