"""The operator endpoint: `/metrics` (prometheus-client's WSGI app) and `/healthz`,
served by the standard library's WSGI server on a daemon thread, away from the NBD
event loop, so a slow scrape never delays a disk request."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from nbdguard.observability.metrics import Metrics

HealthCheck = Callable[[], tuple[bool, str]]  # (healthy, one-line reason)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood stderr; access logs are not wanted."""


def operator_app(metrics: Metrics, health: HealthCheck) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            healthy, reason = health()
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [reason.encode() + b"\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    return app


class OperatorEndpoint:
    """A running HTTP endpoint; `port` is the bound port (useful when 0 was asked)."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: HealthCheck) -> None:
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._server = make_server(
            host, port, operator_app(metrics, health), server_class, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="nbdguard-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
