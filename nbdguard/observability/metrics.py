"""Prometheus metrics: one registry. Rare events use prometheus-client's objects with
label children bound once; per-request numbers are plain ints read at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nbdguard import __version__
from nbdguard.guard.signatures import RULE_SETS
from nbdguard.protocol.constants import Command

# 10 µs .. 10 s, roughly three buckets a decade.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
COMMAND_LABELS: dict[int, str] = {
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.CACHE: "cache",
    Command.WRITE_ZEROES: "write_zeroes",
    Command.BLOCK_STATUS: "block_status",
}
UNKNOWN_COMMAND = "other"
_READ, _WRITE = int(Command.READ), int(Command.WRITE)

# Every label value known before the first event is exposed at 0 from the start, so that a
# healthy server shows zeros rather than "no data", and so that increase() sees the first
# event (a series born at 1 has no earlier sample to rise from). Names not listed here
# still work: they just appear at their first event.

# How a connection's handshake ended. Listing exports or querying one (NBD_OPT_LIST,
# NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT) and then sending NBD_OPT_ABORT is normal use
# (`nbdinfo --list`), not a failure; "failed" has the reason in nbdguard_handshake_failures.
HANDSHAKE_OUTCOMES = ("transmission", "list", "info", "aborted", "failed")
CLEAN_HANDSHAKE_ENDS = ("list", "info", "aborted")  # HandshakeClosed codes of a clean ABORT
HANDSHAKE_FAILURE_REASONS = (
    "bad_client_flags",
    "bad_option_magic",
    "too_many_options",
    "oversized_option",
    "unknown_export",
    "export_busy",
    "tls_required",
    "tls",
    "certificate",  # a client certificate with a repeated subject attribute
    "timeout",
    "disconnected",
)
LIMITS = (
    "max_connections",
    "max_connections_per_client",
    "export_max_connections",
    "max_requests_in_flight",
    "max_buffered_bytes_per_connection",
    "idle_timeout",
    "evicted_idle",
)
CHAIN_REFUSAL_REASONS = (
    "bad_header",
    "encrypted",
    "unsupported_feature",
    "corrupt",
    "dirty",
    "too_deep",
    "cycle",
    "locked",
    "not_regular_file",
    "open_failed",
    "changed_during_open",
    "outside_allow_dirs",
    "protocol_name",
    "pin_mismatch",
    "format_missing",
    "unsupported_format",
)
HTTP_ERROR_REASONS = (
    "closed",
    "incomplete",
    "timeout",
    "reset",
    "malformed",
    "head_too_large",
    "write_timeout",
    "accept_failed",
    "exposition_failed",
    "internal",
)
# The commands a sector-0 guard can refuse (a trimmed or zeroed sector 0 is checked too).
GUARDED_COMMANDS = ("write", "write_zeroes", "trim")
NO_HEADER = "none"  # nbdguard_export_existing_header's format label when sector 0 is no header


def command_label(command: int) -> str:
    """The `command` label value (and log field) for a request's command code."""
    return COMMAND_LABELS.get(command, UNKNOWN_COMMAND)


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
        self.handshakes = Counter(
            "nbdguard_handshakes",
            "Handshakes by how they ended: transmission, list/info/aborted (the client asked "
            "what it wanted, then sent NBD_OPT_ABORT) or failed.",
            ["outcome"],
            registry=r,
        )
        self.handshake_outcome = {o: self.handshakes.labels(outcome=o) for o in HANDSHAKE_OUTCOMES}
        self.handshake_failures = Counter(
            "nbdguard_handshake_failures",
            "Handshakes that failed (outcome=failed), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in HANDSHAKE_FAILURE_REASONS:
            self.handshake_failures.labels(reason=reason)
        self.exports: list[ExportMetrics] = []
        r.register(_RequestCollector(self))
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
        self.sector_lock_timeouts = Counter(
            "nbdguard_sector0_lock_timeouts",
            "Sector-0 writes failed (EIO) because another process held the file's sector lock.",
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
            "Exports refused at open because a file of their chain was refused.",
            ["export", "reason"],
            registry=r,
        )
        self.qcow2_corruption = Counter(
            "nbdguard_qcow2_corruption",
            "Impossible qcow2 metadata found while serving (the export turned read-only).",
            ["export", "kind"],
            registry=r,
        )
        self.limit_hits = Counter(
            "nbdguard_limit_hits",
            "Connections or requests refused because a configured limit was reached.",
            ["limit"],
            registry=r,
        )
        for limit in LIMITS:
            self.limit_hits.labels(limit=limit)
        self.http_refused = Counter(
            "nbdguard_http_connections_refused",
            "Operator-endpoint (HTTP) connections closed at once: the connection cap was reached.",
            registry=r,
        )
        self.http_errors = Counter(
            "nbdguard_http_errors",
            "Operator-endpoint (HTTP) connections ended by an error (reset, timeout, malformed).",
            ["reason"],
            registry=r,
        )
        for reason in HTTP_ERROR_REASONS:
            self.http_errors.labels(reason=reason)
        self.build_info = Gauge("nbdguard_build_info", "nbdguard version.", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)

    def for_export(self, export: str, *, per_request: bool = True) -> ExportMetrics:
        """The export's metrics; an export removed and added back by a reload gets its old
        object again, so that its series stay single and its counters never go back."""
        for existing in self.exports:
            if existing.export == export:
                existing.per_request = per_request
                existing.opening()
                return existing
        return ExportMetrics(self, export, per_request=per_request)

    def limit_hit(self, limit: str) -> None:
        self.limit_hits.labels(limit=limit).inc()

    def handshake_ended(self, code: str) -> None:
        """A handshake closed before transmission, with HandshakeClosed's (or the
        connection's) code: a clean ABORT is an outcome of its own, anything else failed."""
        if code in CLEAN_HANDSHAKE_ENDS:
            self.handshake_outcome[code].inc()
            return
        self.handshake_outcome["failed"].inc()
        self.handshake_failures.labels(reason=code).inc()

    handshake_failed = handshake_ended  # the name the connection calls


class CommandStats:
    """Counts for one (export, command), kept as plain numbers on the hot path."""

    __slots__ = ("buckets", "bytes", "count", "latency_sum")

    def __init__(self) -> None:
        self.count = 0
        self.latency_sum = 0.0
        self.bytes = 0  # lengths of the requests that succeeded (read/written for READ/WRITE)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # last one: above 10 s


class ExportMetrics:
    """The metrics of one export. `request_started`/`request_finished` are the hot path: they
    touch only Python ints and a bisect; `_RequestCollector` turns them into Prometheus
    families when scraped (prometheus-client's own counters take a lock per update, which
    cost a third of 4k-read throughput)."""

    def __init__(self, metrics: Metrics, export: str, *, per_request: bool = True) -> None:
        self.metrics = metrics
        self.export = export
        self.per_request = per_request
        self.commands = {int(code): CommandStats() for code in COMMAND_LABELS}
        self.other = CommandStats()
        self.errors: dict[tuple[str, int], int] = {}
        self.in_flight = 0
        self.buffered_bytes = 0  # held by this export's connections (budget.py)
        self.throttled_seconds = 0.0  # spent by them not being read, at their byte budget
        self._connections = metrics.connections.labels(export=export)
        self._connections_total = metrics.connections_total.labels(export=export)
        rmw = metrics.sector0_rmw.labels(export=export)
        self.count_rmw: Callable[[], None] = rmw.inc
        self._transmission = metrics.handshake_outcome["transmission"]
        metrics.sector_lock_timeouts.labels(export=export)
        for reason in CHAIN_REFUSAL_REASONS:
            metrics.chain_refused.labels(export=export, reason=reason)
        self._header_reported = False
        metrics.exports.append(self)

    def opening(self) -> None:
        """The export is being opened (again): what sector 0 held is not known yet (an
        export refused for its header then has no existing_header series at all)."""
        self._header_reported = False
        self._set_existing_header(None, 0)

    def opened(self, *, size: int, fmt: str, read_only: bool, header_guard: str) -> None:
        """The export is served: its static series, and zeros for every header format its
        guard can refuse and for "sector 0 holds no header" (existing_header overrides)."""
        metrics = self.metrics
        for rule in RULE_SETS.get(header_guard, ()):
            for command in GUARDED_COMMANDS:
                metrics.header_writes_blocked.labels(
                    export=self.export, format=rule.format, command=command
                )
        if not self._header_reported:
            self._set_existing_header(NO_HEADER, 0)
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
        self._transmission.inc()
        self._connections.inc()
        self._connections_total.inc()

    def connection_closed(self) -> None:
        self._connections.dec()

    def request_started(self) -> float:
        """Mark a request in flight; returns its start time for request_finished."""
        self.in_flight += 1
        return perf_counter()

    def request_finished(self, command: int, length: int, error: int, started: float) -> None:
        self.in_flight -= 1
        if not self.per_request:
            return
        elapsed = perf_counter() - started
        stats = self.commands.get(command, self.other)
        stats.count += 1
        stats.latency_sum += elapsed
        stats.buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        if error:
            key = (command_label(command), error)
            self.errors[key] = self.errors.get(key, 0) + 1
        else:
            stats.bytes += length

    @property
    def read_bytes(self) -> int:
        return self.commands[_READ].bytes

    @property
    def written_bytes(self) -> int:
        return self.commands[_WRITE].bytes

    def buffered(self, delta: int) -> None:
        self.buffered_bytes += delta

    def throttled(self, seconds: float) -> None:
        self.throttled_seconds += seconds

    def blocked(self, detected_format: str, command: str) -> None:
        self.metrics.header_writes_blocked.labels(
            export=self.export, format=detected_format, command=command
        ).inc()

    def sector_lock_timeout(self) -> None:
        self.metrics.sector_lock_timeouts.labels(export=self.export).inc()

    def qcow2_corrupt(self, kind: str) -> None:
        self.metrics.qcow2_corruption.labels(export=self.export, kind=kind).inc()

    def existing_header(self, detected_format: str) -> None:
        """Reported while the export opens, before `opened`."""
        self._header_reported = True
        self._set_existing_header(detected_format, 1)

    def _set_existing_header(self, fmt: str | None, value: int) -> None:
        """One series per export: format="none" at 0, or the detected format at 1 (None:
        no series)."""
        gauge = self.metrics.existing_header
        for labels in _label_sets(gauge):
            if labels["export"] == self.export and labels["format"] != fmt:
                gauge.remove(self.export, labels["format"])
        if fmt is not None:
            gauge.labels(export=self.export, format=fmt).set(value)


def _label_sets(metric: Gauge) -> list[dict[str, str]]:
    """The label sets a labelled metric has children for (read through collect())."""
    return [dict(s.labels) for family in metric.collect() for s in family.samples]


class _RequestCollector(Collector):
    """Exposes every export's request counters and latency histograms at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> list[Metric]:
        requests = CounterMetricFamily(
            "nbdguard_requests", "Requests served.", labels=["export", "command"]
        )
        errors = CounterMetricFamily(
            "nbdguard_request_errors",
            "Requests answered with an error.",
            labels=["export", "command", "errno"],
        )
        latency = HistogramMetricFamily(
            "nbdguard_request_duration_seconds",
            "Time from request received to reply sent.",
            labels=["export", "command"],
        )
        read = CounterMetricFamily(
            "nbdguard_read_bytes", "Bytes returned by READ.", labels=["export"]
        )
        written = CounterMetricFamily(
            "nbdguard_written_bytes", "Bytes accepted by WRITE.", labels=["export"]
        )
        in_flight = GaugeMetricFamily(
            "nbdguard_requests_in_flight",
            "Requests received and not yet answered.",
            labels=["export"],
        )
        buffered = GaugeMetricFamily(
            "nbdguard_buffered_bytes",
            "Reply and payload bytes held in memory for the export's connections.",
            labels=["export"],
        )
        throttled = CounterMetricFamily(
            "nbdguard_throttled_seconds",
            "Time the export's connections were not read because they held their byte budget.",
            labels=["export"],
        )
        for export in list(self._metrics.exports):
            name = export.export
            items = [(command_label(code), st) for code, st in export.commands.items()]
            for label, stats in [*items, (UNKNOWN_COMMAND, export.other)]:
                buckets = list(stats.buckets)  # one consistent snapshot
                requests.add_metric([name, label], sum(buckets))
                cumulative = list(accumulate(buckets))
                bounds = [repr(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
                latency.add_metric(
                    [name, label], list(zip(bounds, cumulative, strict=True)), stats.latency_sum
                )
            for (label, code), count in list(export.errors.items()):
                errors.add_metric([name, label, str(code)], count)
            read.add_metric([name], export.read_bytes)
            written.add_metric([name], export.written_bytes)
            in_flight.add_metric([name], export.in_flight)
            buffered.add_metric([name], export.buffered_bytes)
            throttled.add_metric([name], export.throttled_seconds)
        return [requests, errors, latency, read, written, in_flight, buffered, throttled]
