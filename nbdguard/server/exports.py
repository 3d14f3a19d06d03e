"""Exports as the server holds them: a device stack plus what the handshake advertises."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

from nbdguard.config import ACCESS_KEYS, ExportConfig
from nbdguard.errors import NbdguardError
from nbdguard.observability.metrics import ExportMetrics
from nbdguard.observability.reporter import ExportReporter
from nbdguard.protocol.constants import (
    MAX_PAYLOAD,
    MIN_BLOCK_SIZE,
    PREFERRED_BLOCK_SIZE,
    TransmissionFlag,
)
from nbdguard.protocol.handshake import ExportInfo
from nbdguard.storage.device import BlockDevice, Capabilities
from nbdguard.storage.stack import build_device

_WRITE_FLAGS = (
    TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
)
# What a reload may change on an open export: decided per connection at its handshake, so
# new connections get the new values and open ones keep what they negotiated.
LIVE_KEYS = frozenset((*ACCESS_KEYS, "read_only"))


@dataclass(slots=True)
class Export:
    """One configured export, opened: every connection to it shares this object."""

    config: ExportConfig
    device: BlockDevice
    info: ExportInfo
    metrics: ExportMetrics
    connections: int = 0
    retired: bool = False  # removed by a reload: closed when its last connection goes
    closed: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def attach(self) -> None:
        self.connections += 1

    def detach(self) -> None:
        """A connection to this export ended; a retired export closes with its last one."""
        self.connections -= 1
        if self.retired and self.connections == 0:
            self.close()

    def reconfigure(self, config: ExportConfig) -> list[str] | None:
        """Serve new connections by a reloaded definition, if the open device allows it.

        Returns the keys that changed, or None (nothing applied) when the change needs a
        reopen: any key but LIVE_KEYS, or read_only turned off on a device opened read-only.
        Turning read_only on keeps the writable device and only advertises NBD_FLAG_READ_ONLY,
        which the validator then enforces (EPERM) on those connections.
        """
        old = self.config
        changed = [
            key.name
            for key in fields(config)
            if getattr(config, key.name) != getattr(old, key.name)
        ]
        writable = not self.device.capabilities.read_only
        if not LIVE_KEYS.issuperset(changed) or not (config.read_only or writable):
            return None
        self.config = config
        flags = transmission_flags(self.device.capabilities, read_only=config.read_only)
        self.info = replace(self.info, flags=flags)
        return changed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.device.close()


def transmission_flags(capabilities: Capabilities, *, read_only: bool = False) -> int:
    """What the handshake advertises; read_only hides a writable device's write support."""
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_DF
        | TransmissionFlag.SEND_CACHE
    )
    if capabilities.read_only or read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= _WRITE_FLAGS
        if capabilities.fast_zero:
            flags |= TransmissionFlag.SEND_FAST_ZERO
    if capabilities.multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


def open_export(config: ExportConfig, metrics: ExportMetrics) -> Export:
    """Open the export's device stack; raises ExportOpenError with the reason."""
    device = build_device(config, ExportReporter(config.name, metrics))
    info = ExportInfo(
        name=config.name,
        description=config.description,
        size=device.size,
        flags=transmission_flags(device.capabilities, read_only=config.read_only),
        min_block=MIN_BLOCK_SIZE,
        preferred_block=PREFERRED_BLOCK_SIZE,
        max_payload=MAX_PAYLOAD,
    )
    return Export(config, device, info, metrics)


class ExportRegistry:
    """The open exports by name; the handshake's ExportDirectory."""

    def __init__(self, exports: Iterable[Export] = ()) -> None:
        self._exports: dict[str, Export] = {export.name: export for export in exports}

    @property
    def exports(self) -> Mapping[str, Export]:
        return self._exports

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def add(self, export: Export) -> None:
        self._exports[export.name] = export

    def retire(self, name: str) -> Export | None:
        """Stop offering an export; it closes now, or when its last connection ends."""
        export = self._exports.pop(name, None)
        if export is not None:
            export.retired = True
            if export.connections == 0:
                export.close()
        return export

    def visible_exports(self) -> Iterable[ExportInfo]:
        return [export.info for export in self._exports.values()]

    def find(self, name: str) -> ExportInfo | None:
        export = self._exports.get(name)
        return export.info if export is not None else None

    def close_all(self) -> list[CloseFailure]:
        """Close every export, even past one whose close raises: a failed metadata write on
        one image must not leave the others open. The failures are returned, to be reported
        by the caller (who may be unwinding another error)."""
        failures = []
        for export in self._exports.values():
            try:
                export.close()
            except Exception as err:  # reported by the caller, never lost
                failures.append(CloseFailure(export.name, "close", err))
        return failures


@dataclass(frozen=True, slots=True)
class CloseFailure:
    """One export whose flush or close at shutdown raised (ENOSPC on a qcow2 table, EIO…)."""

    export: str
    step: str  # "flush" or "close"
    error: Exception


class CloseFailed(NbdguardError):
    """Raised by the server's shutdown once every export was flushed and closed as far as it
    could be, and each failure logged: the process must exit with a status that says so."""

    def __init__(self, failures: list[CloseFailure]) -> None:
        self.failures = failures
        names = sorted({failure.export for failure in failures})
        super().__init__(f"export(s) failed to flush or close: {', '.join(names)}")
