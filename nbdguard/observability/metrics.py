"""Prometheus metrics: one registry; label children bound once per export (and per
command) so that the per-request cost is a few attribute lookups and increments."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nbdguard import __version__
from nbdguard.protocol.constants import Command

# 10 µs .. 10 s, roughly three buckets a decade.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
COMMAND_LABELS = {
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.CACHE: "cache",
    Command.WRITE_ZEROES: "write_zeroes",
    Command.BLOCK_STATUS: "block_status",
}
UNKNOWN_COMMAND = "other"


class Metrics:
    """Every metric nbdguard exports, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "nbdguard_connections", "Open client connections.", ["export"], registry=r
        )
        # Not "nbdguard_connections_total": a counter claims its base name too, which the
        # gauge above owns (prometheus-client refuses the pair, and so would the text format).
        self.connections_total = Counter(
            "nbdguard_connections_opened",
            "Connections that reached transmission.",
            ["export"],
            registry=r,
        )
        self.handshake_failures = Counter(
            "nbdguard_handshake_failures",
            "Connections that ended during the handshake.",
            ["reason"],
            registry=r,
        )
        self.requests = Counter(
            "nbdguard_requests", "Requests served.", ["export", "command"], registry=r
        )
        self.request_errors = Counter(
            "nbdguard_request_errors",
            "Requests answered with an error.",
            ["export", "command", "errno"],
            registry=r,
        )
        self.latency = Histogram(
            "nbdguard_request_duration_seconds",
            "Time from request received to reply sent.",
            ["export", "command"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.read_bytes = Counter(
            "nbdguard_read_bytes", "Bytes returned by READ.", ["export"], registry=r
        )
        self.written_bytes = Counter(
            "nbdguard_written_bytes", "Bytes accepted by WRITE.", ["export"], registry=r
        )
        self.in_flight = Gauge(
            "nbdguard_requests_in_flight",
            "Requests received and not yet answered.",
            ["export"],
            registry=r,
        )
        self.export_size = Gauge(
            "nbdguard_export_size_bytes", "Export size in bytes.", ["export"], registry=r
        )
        self.export_info = Gauge(
            "nbdguard_export_info",
            "Static facts about an export (always 1).",
            ["export", "format", "read_only", "header_guard"],
            registry=r,
        )
        self.export_up = Gauge(
            "nbdguard_export_up",
            "1 while the export is open and served.",
            ["export"],
            registry=r,
        )
        self.header_writes_blocked = Counter(
            "nbdguard_header_writes_blocked",
            "Writes refused because sector 0 would have become an image-format header.",
            ["export", "format", "command"],
            registry=r,
        )
        self.sector0_rmw = Counter(
            "nbdguard_sector0_rmw",
            "Guarded read-modify-writes of sector 0 performed.",
            ["export"],
            registry=r,
        )
        self.existing_header = Gauge(
            "nbdguard_export_existing_header",
            "1 when the export's sector 0 already matched a header rule at startup.",
            ["export", "format"],
            registry=r,
        )
        self.chain_refused = Counter(
            "nbdguard_chain_refused",
            "Backing-chain layers refused at export open.",
            ["reason"],
            registry=r,
        )
        self.build_info = Gauge("nbdguard_build_info", "nbdguard version.", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)

    def for_export(self, export: str, *, per_request: bool = True) -> ExportMetrics:
        return ExportMetrics(self, export, per_request=per_request)

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures.labels(reason=reason).inc()


class CommandMetrics:
    """Pre-bound children for one (export, command)."""

    __slots__ = ("count", "latency")

    def __init__(self, metrics: Metrics, export: str, command: str) -> None:
        self.count = metrics.requests.labels(export=export, command=command)
        self.latency = metrics.latency.labels(export=export, command=command)


class ExportMetrics:
    """The metrics of one export; `request_started`/`request_finished` are the hot path."""

    def __init__(self, metrics: Metrics, export: str, *, per_request: bool = True) -> None:
        self.metrics = metrics
        self.export = export
        self.per_request = per_request
        self._commands = {
            int(code): CommandMetrics(metrics, export, label)
            for code, label in COMMAND_LABELS.items()
        }
        self._other = CommandMetrics(metrics, export, UNKNOWN_COMMAND)
        self._read_bytes = metrics.read_bytes.labels(export=export)
        self._written_bytes = metrics.written_bytes.labels(export=export)
        self._in_flight = metrics.in_flight.labels(export=export)
        self._connections = metrics.connections.labels(export=export)
        self._connections_total = metrics.connections_total.labels(export=export)
        rmw = metrics.sector0_rmw.labels(export=export)
        self.count_rmw: Callable[[], None] = rmw.inc

    def opened(self, *, size: int, fmt: str, read_only: bool, header_guard: str) -> None:
        self.metrics.export_size.labels(export=self.export).set(size)
        self.metrics.export_info.labels(
            export=self.export,
            format=fmt,
            read_only=str(read_only).lower(),
            header_guard=header_guard,
        ).set(1)
        self.metrics.export_up.labels(export=self.export).set(1)

    def closed(self) -> None:
        self.metrics.export_up.labels(export=self.export).set(0)

    def connection_opened(self) -> None:
        self._connections.inc()
        self._connections_total.inc()

    def connection_closed(self) -> None:
        self._connections.dec()

    def request_started(self) -> float:
        """Mark a request in flight; returns its start time for request_finished."""
        if self.per_request:
            self._in_flight.inc()
        return perf_counter()

    def request_finished(self, command: int, length: int, error: int, started: float) -> None:
        if not self.per_request:
            return
        children = self._commands.get(command, self._other)
        children.count.inc()
        children.latency.observe(perf_counter() - started)
        self._in_flight.dec()
        if error:
            label = COMMAND_LABELS.get(command, UNKNOWN_COMMAND)  # type: ignore[call-overload]
            self.metrics.request_errors.labels(
                export=self.export, command=label, errno=str(error)
            ).inc()
        elif command == Command.READ:
            self._read_bytes.inc(length)
        elif command == Command.WRITE:
            self._written_bytes.inc(length)

    def blocked(self, detected_format: str, command: str) -> None:
        self.metrics.header_writes_blocked.labels(
            export=self.export, format=detected_format, command=command
        ).inc()

    def existing_header(self, detected_format: str) -> None:
        self.metrics.existing_header.labels(export=self.export, format=detected_format).set(1)
