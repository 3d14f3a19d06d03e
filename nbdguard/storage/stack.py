"""Build an export's layer stack from its config: storage, format driver, guard."""

from __future__ import annotations

from nbdguard.config import ExportConfig
from nbdguard.errors import ExportOpenError
from nbdguard.storage.device import BlockDevice
from nbdguard.storage.pinned import open_pinned
from nbdguard.storage.raw import RawImage


def build_device(config: ExportConfig) -> BlockDevice:
    if config.format == "raw":
        opened = open_pinned(config.path, read_only=config.read_only, export=config.name)
        return RawImage(opened)
    raise ExportOpenError(
        f"export {config.name!r}: format {config.format!r} is not supported by this build"
    )
