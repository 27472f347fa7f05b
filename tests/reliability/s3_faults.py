"""A real S3 endpoint with faults: an HTTP proxy on 127.0.0.1 in front of a moto S3 server.

Usage::

    moto = MotoServer().start()
    proxy = FaultProxy(moto.port).start()           # point s3fs / StorageConfig at proxy.url
    proxy.add(Rule(action="slowdown", times=3))     # the next 3 requests answer 503 SlowDown
    proxy.add(Rule(action="cut", method="PUT", path_has="/candidates/"))   # every such PUT: half
                                                    # its body reaches moto, then both sockets close
    moto.stop(); moto.start()                       # an outage: the proxy drops every request meanwhile

Actions: ``slowdown`` (503 SlowDown, the S3 throttling answer), ``internal`` (500 InternalError),
``drop`` (the connection closes with no answer), ``cut`` (the request's headers and half its body
are forwarded, then both connections close: the server sees a body that ends early). Requests no
rule takes are forwarded unchanged; when the server is down, they are dropped. ``counts`` tallies
what each request got.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "internal": (500, "InternalError", "We encountered an internal error. Please try again.")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """A moto S3 server on a fixed port that can be stopped and started again; its buckets and
    objects live in this process's moto backend, so they survive the restart (like S3 itself)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@dataclass
class Rule:
    action: str                     # slowdown | internal | drop | cut
    method: str | None = None       # only this HTTP method
    path_has: str | None = None     # only paths containing this
    times: int | None = None        # how many requests it takes (None: every one)

    def takes(self, method: str, path: str) -> bool:
        return ((self.method is None or method == self.method)
                and (self.path_has is None or self.path_has in path)
                and (self.times is None or self.times > 0))


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.rules: list[Rule] = []
        self.counts: Counter = Counter()
        self.seen: list[tuple[str, str, str]] = []   # (method, path, what it got)
        self.on_request = None                       # optional callback(method, path) before the rules
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            for rule in self.rules:
                if rule.takes(method, path):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.action
        return "forward"

    def _record(self, method: str, path: str, what: str) -> None:
        with self._lock:
            self.counts[what] += 1
            self.seen.append((method, path, what))

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self) -> None:
                method, path = self.command, self.path
                if proxy.on_request is not None:
                    proxy.on_request(method, path)
                action = proxy._decide(method, path)
                body = self._body()
                if action in _ERRORS:
                    status, code, message = _ERRORS[action]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                           f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(xml)
                    proxy._record(method, path, action)
                    return
                if action == "drop":
                    proxy._record(method, path, "drop")
                    return self._drop()
                if action == "cut":
                    self._cut(method, path, body)
                    proxy._record(method, path, "cut")
                    return self._drop()
                self._forward(method, path, body)

            def _headers(self, body: bytes) -> dict:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                return headers

            def _cut(self, method: str, path: str, body: bytes) -> None:
                """The request line, headers and half the body reach the server; then the
                connection closes, as when a writer dies or the network breaks mid-upload."""
                try:
                    up = socket.create_connection(("127.0.0.1", proxy.upstream_port), timeout=10)
                except OSError:
                    return
                head = f"{method} {path} HTTP/1.1\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in self._headers(body).items()) + "\r\n"
                try:
                    up.sendall(head.encode("latin-1") + body[: len(body) // 2])
                finally:
                    up.close()

            def _forward(self, method: str, path: str, body: bytes) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.request(method, path, body=body if body or method in ("PUT", "POST") else None,
                                 headers=self._headers(body))
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:  # the server is down: the client sees its connection close
                    proxy._record(method, path, "down")
                    return self._drop()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and (k.lower() != "content-length" or method == "HEAD"):
                        self.send_header(k, v)
                if method != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)
                proxy._record(method, path, "forward")

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
