"""Prometheus metrics: one registry, label children bound once per export so the
per-request cost is an attribute lookup and an increment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from nbdguard import __version__


class Metrics:
    """Every metric nbdguard exports, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.build_info = Gauge("nbdguard_build_info", "nbdguard version.", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)

    def for_export(self, export: str) -> ExportMetrics:
        rmw = self.sector0_rmw.labels(export=export)
        return ExportMetrics(self, export, rmw.inc)


@dataclass(frozen=True, slots=True)
class ExportMetrics:
    """Pre-bound children for one export."""

    metrics: Metrics
    export: str
    count_rmw: Callable[[], None]

    def blocked(self, detected_format: str, command: str) -> None:
        self.metrics.header_writes_blocked.labels(
            export=self.export, format=detected_format, command=command
        ).inc()

    def existing_header(self, detected_format: str) -> None:
        self.metrics.existing_header.labels(export=self.export, format=detected_format).set(1)


def start_metrics_endpoint(metrics: Metrics, host: str, port: int) -> tuple[Any, Any]:
    """Serve /metrics from prometheus-client's own HTTP server (a daemon thread)."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, thread
