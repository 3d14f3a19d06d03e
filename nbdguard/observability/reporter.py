"""What the layers of one export report about themselves (nbdkit's filters log for
themselves): each layer is given the export's reporter and calls it; the reporter logs the
event with the export's context and counts it. The dispatcher and the app need not know
which layers exist."""

from __future__ import annotations

from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nbdguard.observability.logging import get_logger
from nbdguard.observability.metrics import ExportMetrics

if TYPE_CHECKING:
    from nbdguard.guard.sector0 import HeaderWriteBlocked

# Who is being served right now ({"conn": 7, "client": "unix:uid=1000"}): set by the
# connection around the requests it hands to the device stack (once per receive, not per
# request), so that a layer's event names the client without the layer knowing it.
connection_context: ContextVar[MappingProxyType[str, Any]] = ContextVar(
    "nbdguard_connection", default=MappingProxyType({})
)


class ExportReporter:
    """Events and counters of one export, for the layers of its device stack."""

    def __init__(self, export: str, metrics: ExportMetrics | None = None, log: Any = None) -> None:
        self.export = export
        self.metrics = metrics
        self.log: Any = log if log is not None else get_logger(export=export)

    def count_rmw(self) -> None:
        """The guard read-modify-wrote sector 0."""
        if self.metrics is not None:
            self.metrics.count_rmw()

    def header_write_blocked(
        self, blocked: HeaderWriteBlocked, command: str, offset: int, length: int
    ) -> None:
        """The guard refused a request that would have made sector 0 an image header."""
        if self.metrics is not None:
            self.metrics.blocked(blocked.format, command)
        self.log.warning(
            "guard.header_write_blocked",
            **connection_context.get(),
            command=command,
            offset=offset,
            length=length,
            format=blocked.format,
            sector_head=blocked.sector_head.hex(),
        )

    def existing_header(self, detected: str, path: str) -> None:
        """Sector 0 already matched a header rule when the export opened (and is served)."""
        if self.metrics is not None:
            self.metrics.existing_header(detected)
        self.log.warning(
            "export.existing_header",
            path=path,
            format=detected,
            message="sector 0 already matches an image-format header; probing tools "
            "would misread this raw image",
        )

    def sector_lock_timeout(self) -> None:
        """A sector-0 write gave up waiting for a lock another process held (EIO)."""
        if self.metrics is not None:
            self.metrics.sector_lock_timeout()
        self.log.warning("guard.sector_lock_timeout", **connection_context.get())

    def qcow2_corrupt(
        self, *, kind: str, detail: str, guest_offset: int | None, host_offset: int | None
    ) -> None:
        """A qcow2 layer found impossible metadata (and turned the export read-only)."""
        if self.metrics is not None:
            self.metrics.qcow2_corrupt(kind)
        self.log.error(
            "qcow2.corrupt",
            **connection_context.get(),
            kind=kind,
            detail=detail,
            guest_offset=guest_offset,
            host_offset=host_offset,
        )
