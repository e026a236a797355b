"""An HTTP proxy on 127.0.0.1 in front of a real `mlflow server` that starts refusing writes when a test says so,
as MLflow's basic-auth server answers once credentials expire (401) or a permission is revoked (403), with its
bodies and headers. Reads go on being forwarded: a read-only user reads, and so does a client whose writes stop
(test_credentials.py).

A write is any PUT, PATCH or DELETE (artifact uploads among them), and a POST other than MLflow's searches
(`.../search`), which are reads sent as POST.
"""

from __future__ import annotations

import collections
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# What MLflow's basic-auth app (mlflow/server/auth) answers.
REFUSALS = {401: (b"You are not authenticated. Please see https://www.mlflow.org/docs/latest/auth/index.html"
                  b"#authenticating-to-mlflow on how to authenticate.", {"WWW-Authenticate": 'Basic realm="mlflow"'}),
            403: (b"Permission denied", {})}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class _Handler(BaseHTTPRequestHandler):
    def _handle(self) -> None:
        proxy: RefusingProxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlparse(self.path).path
        write = self.command in ("PUT", "PATCH", "DELETE") or (self.command == "POST" and not path.endswith("/search"))
        status = proxy.refusing
        if write and status is not None:
            proxy.refused[path] += 1
            text, headers = REFUSALS[status]
            self._answer(status, text, headers)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            answer = response.read()
            self._answer(response.status, answer, {k: v for k, v in response.getheaders()
                                                   if k.lower() not in HOP_BY_HOP})
        finally:
            upstream.close()

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)  # HTTP/1.0: the connection closes after this

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest's output clean."""


class RefusingProxy:
    """Forwards to the server at `target` while the `with` block runs, on a thread of its own; after
    `refuse(status)`, answers every write with that status (401 or 403) until `refuse(None)`. `refused` counts
    the writes refused, by path."""

    def __init__(self, target: str) -> None:
        self.target_port = urlparse(target).port
        self.refusing: int | None = None
        self.refused: collections.Counter[str] = collections.Counter()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.proxy = self
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"

    def refuse(self, status: int | None) -> None:
        assert status is None or status in REFUSALS, status
        self.refusing = status

    def __enter__(self) -> RefusingProxy:
        threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
