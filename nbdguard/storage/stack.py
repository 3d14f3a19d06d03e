"""Build an export's layer stack from its config: pinned storage, format driver, guard."""

from __future__ import annotations

from collections.abc import Callable

from nbdguard.config import ExportConfig
from nbdguard.errors import ExportOpenError
from nbdguard.guard.sector0 import GuardPolicy, Sector0Guard
from nbdguard.storage.device import BlockDevice
from nbdguard.storage.locks import sector_lock
from nbdguard.storage.pinned import open_pinned
from nbdguard.storage.raw import RawImage


def build_device(config: ExportConfig, *, on_rmw: Callable[[], None] | None = None) -> BlockDevice:
    """Open the export's stack; refuse (ExportOpenError) anything that is not safe to serve."""
    if config.format != "raw":
        raise ExportOpenError(
            f"export {config.name!r}: format {config.format!r} is not supported by this build"
        )
    opened = open_pinned(config.path, read_only=config.read_only, export=config.name)
    raw = RawImage(opened)
    if config.header_guard == "off":
        return raw
    policy = GuardPolicy(config.header_guard, config.allow_headers)
    guard = Sector0Guard(
        raw,
        policy,
        file_lock=lambda: sector_lock(opened.fd),
        on_rmw=on_rmw or (lambda: None),
    )
    existing = guard.existing_header()
    if existing is not None and config.on_existing_header == "refuse":
        guard.close()
        raise ExportOpenError(
            f"export {config.name!r}: sector 0 of {str(opened.path)!r} already holds a "
            f"{existing} header (header_guard = {config.header_guard!r}, "
            'on_existing_header = "refuse")'
        )
    return guard
