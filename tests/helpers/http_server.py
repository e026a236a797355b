"""A local HTTP server on 127.0.0.1 whose routes a test sets: what the download tests fetch from
(test_download.py, tests/downstream). The `server` fixture (conftest.py) starts one per test."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    length: int | None = None  # Content-Length to claim; None sends the body's true length


class _Handler(BaseHTTPRequestHandler):
    """Answers each path with its list of replies in turn (the last one repeats), 404 if unknown."""

    def do_GET(self) -> None:
        server = self.server
        server.hits[self.path] += 1
        replies = server.routes.get(self.path, [Reply(404)])
        reply = replies[min(server.hits[self.path], len(replies)) - 1]
        self.send_response(reply.status)
        self.send_header("Content-Length", str(len(reply.body) if reply.length is None else reply.length))
        self.end_headers()
        self.wfile.write(reply.body)  # HTTP/1.0: the connection closes after this, short or not

    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest's output clean."""


class Server:
    """A local HTTP server whose routes a test sets; `hits` counts requests per path."""

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes = self.routes = {}
        self.httpd.hits = self.hits = collections.Counter()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def serve(self, path: str, *replies: Reply) -> str:
        self.routes[path] = list(replies)
        return self.url(path)
