"""A fault-injecting HTTP proxy on loopback, in front of a real S3 API server (moto).

Requests are forwarded unchanged, except that a deterministic schedule answers some of them with
S3 throttling (503 SlowDown), an internal error (500) or a dropped connection, the faults an object
store shows a catalog run at scale.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
XML_HEAD = b"<?xml version='1.0' encoding='UTF-8'?>"
SLOW_DOWN = XML_HEAD + b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
INTERNAL = XML_HEAD + b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"


class FaultProxy:
    """Every `throttle_every`-th request gets 503 SlowDown, every `error_every`-th a 500, every
    `drop_every`-th a closed connection (counted over all requests while `armed`)."""

    def __init__(self, upstream: tuple[str, int], throttle_every: int = 5, error_every: int = 7, drop_every: int = 11) -> None:
        self.upstream = upstream
        self.schedule = {"throttle": throttle_every, "error": error_every, "drop": drop_every}
        self.counts: Counter[str] = Counter()
        self.armed = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self) -> str:
        with self._lock:
            self.counts["requests"] += 1
            n = self.counts["requests"]
            if not self.armed:
                return ""
            for kind, every in self.schedule.items():
                if every and n % every == 0:
                    self.counts[kind] += 1
                    return kind
            return ""

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault in ("throttle", "error"):
                    payload = SLOW_DOWN if fault == "throttle" else INTERNAL
                    self.send_response(503 if fault == "throttle" else 500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
