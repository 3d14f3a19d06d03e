"""The one owner of every open() of an image file.

A path is resolved once, opened once, checked on the open descriptor (never by
path again, so there is no time-of-check/time-of-use gap), locked, and held for
the export's lifetime. Nothing here looks at file contents to decide a format.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nbdguard.errors import ExportOpenError
from nbdguard.storage.locks import LockConflict, lock_image


@dataclass(frozen=True, slots=True)
class OpenedFile:
    """An open, checked and locked image file."""

    path: Path  # resolved, symlink-free
    fd: int
    size: int
    block_device: bool
    read_only: bool

    def close(self) -> None:
        os.close(self.fd)


def open_pinned(path: Path, *, read_only: bool, export: str) -> OpenedFile:
    """Open an image for an export, or raise ExportOpenError saying exactly why not."""
    resolved = Path(os.path.realpath(path))
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW
    try:
        fd = os.open(resolved, flags)
    except OSError as err:
        raise _refusal(export, path, err.strerror or str(err)) from err
    try:
        return _check_and_lock(fd, resolved, read_only=read_only, export=export)
    except BaseException:
        os.close(fd)
        raise


def _check_and_lock(fd: int, resolved: Path, *, read_only: bool, export: str) -> OpenedFile:
    info = os.fstat(fd)
    block_device = stat.S_ISBLK(info.st_mode)
    if not (stat.S_ISREG(info.st_mode) or block_device):
        raise _refusal(export, resolved, "not a regular file or block device")
    try:
        lock_image(fd, writable=not read_only)
    except LockConflict as err:
        raise _refusal(export, resolved, str(err)) from err
    size = os.lseek(fd, 0, os.SEEK_END) if block_device else info.st_size
    return OpenedFile(resolved, fd, size, block_device, read_only)


def _refusal(export: str, path: Path, reason: str) -> ExportOpenError:
    return ExportOpenError(f"export {export!r}: cannot open {str(path)!r}: {reason}")
