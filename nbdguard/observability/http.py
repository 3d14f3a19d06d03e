"""The operator endpoint: `/metrics` (Prometheus exposition) and `/healthz`.

Why this shape. The endpoint is a door too: whoever can reach the port can open
connections, send half a request and wait, or scrape in a loop. The standard library's
threading WSGI server gave each of them a thread and a descriptor with no cap and no
deadline (a thousand half-open requests took every descriptor of the process, and NBD
clients could no longer connect), and ran one exposition per scrape, each holding the GIL
for milliseconds against the NBD event loop (a scrape storm raised NBD read p99 tenfold).

So HTTP runs on its own small asyncio loop in one daemon thread (`nbdguard-http`), and the
exposition in one more (`nbdguard-exposition`): two threads whatever the load, and the NBD
loop never parses a byte of HTTP nor waits behind a slow peer. Serving on the NBD loop
itself was the alternative; it would put every accept, parse and deadline of a hostile
HTTP peer on the loop whose latency we are protecting, for no gain in simplicity.

- At most `max_connections` HTTP connections are open; a connection beyond the cap is
  closed at once, counted (`nbdguard_http_connections_refused_total`) and logged
  (`http.refused`, rate-limited).
- The request head must arrive whole within `request_timeout` (a deadline, not an idle
  timer: a byte every second does not keep a slot) and within `max_head_bytes`; the reply
  must be taken by the peer within `write_timeout`, and the kernel holds at most
  `send_buffer` of it. One request per connection, so memory is bounded by the cap times
  one exposition.
- Expositions are serialised and shared: a scrape waits for the next exposition that
  starts after it arrived (so it never sees numbers older than itself), every scrape
  waiting for the same format shares it, and the time spent in expositions is a token
  bucket: `exposition_duty` seconds per second, up to `exposition_burst` saved. A few
  scrapes in a row are served at once; however many scrapers there are, expositions take
  at most that share of one thread over time (a storm's scrapes wait their turn, each
  at most `max_exposition_pause`), so the NBD loop rarely waits for the GIL.
- Peer errors (reset, timeout, malformed request) are `http.error` events with `peer` and
  `reason`, counted in `nbdguard_http_errors_total{reason}`, and rate-limited with the
  shared `LogRateLimiter` (its `log.suppressed` summaries say how many were dropped); no
  exception of a connection ever reaches stderr as a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from nbdguard.observability.logging import get_logger
from nbdguard.observability.metrics import Metrics
from nbdguard.observability.ratelimit import SUPPRESSED_EVENT, LogRateLimiter

HealthCheck = Callable[[], tuple[bool, str]]  # (healthy, one-line reason)

ERROR_EVENT = "http.error"
REFUSED_EVENT = "http.refused"
_TEXT = "text/plain; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {431: "Request Header Fields Too Large", 500: "Internal Server Error"}
_REASONS |= {503: "Service Unavailable"}


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of the operator endpoint (see the module docstring)."""

    max_connections: int = 32
    request_timeout: float = 5.0
    write_timeout: float = 3.0
    max_head_bytes: int = 8192
    send_buffer: int = 64 << 10  # SO_SNDBUF: a peer that does not read pins this much
    exposition_duty: float = 0.02
    exposition_burst: float = 0.05
    max_exposition_pause: float = 1.0
    log_burst: int = 10
    log_interval: float = 10.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines += [f"Content-Length: {len(self.body)}", "Connection: close", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        return head if head_only else head + self.body


def text_response(status: int, text: str, *extra: tuple[str, str]) -> Response:
    return Response(status, (("Content-Type", _TEXT), *extra), text.encode())


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value


class MalformedRequest(Exception):
    """The request head is not HTTP/1.x."""


def parse_head(head: bytes) -> Request:
    """Parse a request head (request line and headers, up to the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as err:  # pragma: no cover - latin-1 decodes any byte
        raise MalformedRequest("undecodable") from err
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise MalformedRequest("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise MalformedRequest("bad header line")
        headers[name.lower()] = value.strip()
    target = urlsplit(parts[1])
    return Request(parts[0], target.path, parse_qs(target.query), headers)


# -- expositions -----------------------------------------------------------------------

_ExpositionKey = tuple[str, bool, tuple[str, ...]]  # (Accept header, gzip, name[] filter)


class Expositions:
    """One exposition at a time, in a worker thread, shared by the scrapes waiting for it
    and paced to `duty` of one thread (see the module docstring). Used on one loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        executor: ThreadPoolExecutor,
        *,
        duty: float,
        burst: float,
        max_pause: float,
        on_error: Callable[[Exception], None] = lambda err: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.duty = duty
        self.burst = burst
        self.max_pause = max_pause
        self.on_error = on_error
        self.clock = clock
        self._queued: dict[_ExpositionKey, asyncio.Future[Response]] = {}
        self._wakeup: asyncio.Event | None = None
        self._tokens = burst  # seconds of exposition time that may be spent now
        self._stamp = clock()

    async def get(self, request: Request) -> Response:
        accept = request.headers.get("accept", "")
        key = (
            accept,
            gzip_accepted(request.headers.get("accept-encoding", "")),
            tuple(request.query.get("name[]", ())),
        )
        future = self._queued.get(key)
        if future is None:
            future = self._queued[key] = asyncio.get_running_loop().create_future()
            self._wake().set()
        return await asyncio.shield(future)  # one scraper's timeout must not cancel others'

    async def run(self) -> None:
        """The exposition loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        wakeup = self._wake()
        while True:
            await wakeup.wait()
            wakeup.clear()
            while self._queued:
                delay = self._delay()
                if delay > 0:
                    await asyncio.sleep(delay)
                key = next(iter(self._queued))
                future = self._queued.pop(key)
                started = self.clock()
                try:
                    response = await loop.run_in_executor(self.executor, self._render, key)
                except Exception as err:  # a collector failed: the scrape gets a 500
                    self.on_error(err)
                    response = text_response(500, f"exposition failed: {type(err).__name__}\n")
                self._tokens -= self.clock() - started
                if not future.done():
                    future.set_result(response)

    def _delay(self) -> float:
        """Refill the bucket; how long to wait before the next exposition."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.duty)
        self._stamp = now
        if self._tokens >= 0:
            return 0.0
        wait = min(-self._tokens / self.duty, self.max_pause)
        self._tokens += wait * self.duty  # the debt a capped wait leaves is forgiven
        self._tokens = max(self._tokens, 0.0)
        self._stamp = now + wait
        return wait

    def _wake(self) -> asyncio.Event:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    def _render(self, key: _ExpositionKey) -> Response:
        accept, use_gzip, names = key
        encoder, content_type = choose_encoder(accept)
        registry: Any = self.registry.restricted_registry(list(names)) if names else self.registry
        body: bytes = encoder(registry)
        headers = [("Content-Type", content_type)]
        if use_gzip:
            body = gzip.compress(body, compresslevel=6)
            headers.append(("Content-Encoding", "gzip"))
        return Response(200, tuple(headers), body)


# -- the server ------------------------------------------------------------------------


class _PeerError(Exception):
    """A connection ended by its peer's doing; `reason` is the metric label."""

    def __init__(self, reason: str, reply: Response | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class OperatorEndpoint:
    """A running HTTP endpoint; `port` is the bound port (useful when 0 was asked).

    The socket is bound and listening when the constructor returns (an `OSError` says
    why not); `close()` stops the thread and closes every connection."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        health: HealthCheck,
        limits: HttpLimits | None = None,
    ) -> None:
        self.limits = limits or HttpLimits()
        self.metrics = metrics
        self.health = health
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=128)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self.active = 0  # open HTTP connections (read from tests and the HTTP thread only)
        self._log = get_logger(component="http")
        self._limiter = LogRateLimiter(
            self._log_summary,
            burst=self.limits.log_burst,
            interval=self.limits.log_interval,
            events={ERROR_EVENT, REFUSED_EVENT},
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nbdguard-exposition")
        self.expositions = Expositions(
            metrics.registry,
            self._executor,
            duty=self.limits.exposition_duty,
            burst=self.limits.exposition_burst,
            max_pause=self.limits.max_exposition_pause,
            on_error=self._exposition_failed,
        )
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._stop = asyncio.Event()  # bound to the HTTP loop on first use, there
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="nbdguard-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving; bounded (a stuck thread is left to die with the process)."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already stopped
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._limiter.flush()

    # -- the HTTP thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._sock.close()
            self._loop.close()

    async def _main(self) -> None:
        server = await asyncio.start_server(
            self._on_client, sock=self._sock, limit=self.limits.max_head_bytes
        )
        background = [
            asyncio.create_task(self.expositions.run()),
            asyncio.create_task(self._flush_logs()),
        ]
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in [*background, *self._tasks]:
                task.cancel()
            await asyncio.gather(*background, *self._tasks, return_exceptions=True)

    async def _flush_logs(self) -> None:
        """Summaries of suppressed lines even when the flood has stopped."""
        while True:
            await asyncio.sleep(self.limits.log_interval)
            self._limiter.flush()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if self.active >= self.limits.max_connections:
            self.metrics.http_refused.inc()
            self._event(REFUSED_EVENT, "warning", peer=peer, limit=self.limits.max_connections)
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.active += 1
        try:
            await self._serve(reader, writer)
        except _PeerError as err:
            self._peer_error(peer, err.reason)
        except asyncio.CancelledError:
            pass  # closing
        except Exception as err:  # a bug of ours: one event, never a traceback
            self.metrics.http_errors.labels(reason="internal").inc()
            self._event(ERROR_EVENT, "error", peer=peer, reason="internal", error=repr(err))
        finally:
            self.active -= 1
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read_request(reader)
        except _PeerError as err:
            if err.reply is not None:
                with contextlib.suppress(_PeerError):
                    await self._send(writer, err.reply.encode())
            raise
        response = await self._respond(request)
        await self._send(writer, response.encode(head_only=request.method == "HEAD"))

    async def _read_request(self, reader: asyncio.StreamReader) -> Request:
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise _PeerError("timeout") from None
        except asyncio.IncompleteReadError as err:
            raise _PeerError("incomplete" if err.partial else "closed") from None
        except asyncio.LimitOverrunError:
            raise _PeerError("head_too_large", text_response(431, "request too large\n")) from None
        except ConnectionError:
            raise _PeerError("reset") from None
        try:
            return parse_head(head)
        except MalformedRequest:
            raise _PeerError("malformed", text_response(400, "malformed request\n")) from None

    async def _respond(self, request: Request) -> Response:
        allow = ("Allow", "GET, HEAD, OPTIONS")
        if request.method == "OPTIONS":
            return Response(200, (allow,), b"")
        if request.method not in ("GET", "HEAD"):
            return text_response(405, f"use GET, not {request.method}\n", allow)
        if request.path == "/healthz":
            healthy, reason = self.health()
            return text_response(200 if healthy else 503, reason + "\n")
        if request.path == "/metrics":
            return await self.expositions.get(request)
        return text_response(404, "try /metrics or /healthz\n")

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.transport.set_write_buffer_limits(high=0)  # drain() waits for all of it
        try:
            writer.write(data)
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.drain()
        except TimeoutError:
            raise _PeerError("write_timeout") from None
        except ConnectionError:
            raise _PeerError("reset") from None

    # -- events ----------------------------------------------------------------------------

    def _peer_error(self, peer: str, reason: str) -> None:
        self.metrics.http_errors.labels(reason=reason).inc()
        if reason != "closed":  # a TCP probe that connects and leaves is not an error line
            self._event(ERROR_EVENT, "info", peer=peer, reason=reason)

    def _exposition_failed(self, err: Exception) -> None:
        self.metrics.http_errors.labels(reason="exposition_failed").inc()
        self._event(ERROR_EVENT, "error", reason="exposition_failed", error=repr(err))

    def _event(self, event: str, level: str, **fields: Any) -> None:
        try:
            self._limiter(None, level, {"event": event})
        except structlog.DropEvent:
            return
        getattr(self._log, level)(event, **fields)

    def _log_summary(self, level: str, fields: dict[str, Any]) -> None:
        summary = {k: v for k, v in fields.items() if k not in ("export", "client", "conn")}
        getattr(self._log, level)(SUPPRESSED_EVENT, **summary)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """What asyncio would print with a traceback becomes one event."""
        error = context.get("exception")
        reason = "accept_failed" if isinstance(error, OSError) else "internal"  # EMFILE, …
        self.metrics.http_errors.labels(reason=reason).inc()
        self._event(
            ERROR_EVENT,
            "error",
            reason=reason,
            error=repr(error) if error is not None else str(context.get("message")),
        )


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
