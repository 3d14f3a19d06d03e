"""The one owner of every open() of an image file.

A path is resolved once, opened once, checked on the open descriptor (never by
path again, so there is no time-of-check/time-of-use gap), locked, and held for
the export's lifetime. Nothing here looks at file contents to decide a format.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from nbdguard.errors import ChainRefused
from nbdguard.storage.locks import LockConflict, lock_image


@dataclass(frozen=True, slots=True)
class OpenedFile:
    """An open, checked and locked image file."""

    path: Path  # resolved, symlink-free
    fd: int
    size: int
    block_device: bool
    read_only: bool
    identity: tuple[int, int]  # (st_dev, st_ino): the same file reached twice is a cycle

    def close(self) -> None:
        os.close(self.fd)


def open_pinned(
    path: Path,
    *,
    read_only: bool,
    export: str,
    layer: int = 0,
    regular_only: bool = False,
    lock: bool = True,
    already_open: Set[tuple[int, int]] = frozenset(),
) -> OpenedFile:
    """Open one file of an export's chain, or raise ChainRefused saying exactly why not.

    O_NONBLOCK keeps a FIFO from blocking the open; the descriptor is then refused
    as not a regular file. Block devices are accepted unless `regular_only`. `lock=False`
    is for inspecting an image that may be in use, never for serving it. A file whose
    (st_dev, st_ino) is in `already_open` is a cycle, refused before locking (our own lock
    on its first open would otherwise make it look locked by someone else).
    """
    resolved = Path(os.path.realpath(path))
    flags = os.O_RDONLY if read_only else os.O_RDWR
    flags |= os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(resolved, flags)
    except OSError as err:
        reason = "not_regular_file" if err.errno == errno.EISDIR else "open_failed"
        raise ChainRefused(export, layer, str(path), reason, err.strerror or str(err)) from err
    try:
        info = os.fstat(fd)
        block_device = stat.S_ISBLK(info.st_mode)
        if not (stat.S_ISREG(info.st_mode) or (block_device and not regular_only)):
            wanted = "a regular file" if regular_only else "a regular file or block device"
            raise ChainRefused(export, layer, str(resolved), "not_regular_file", f"not {wanted}")
        if (info.st_dev, info.st_ino) in already_open:
            detail = "this file already appears in the chain"
            raise ChainRefused(export, layer, str(path), "cycle", detail)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if lock:
            _lock(fd, resolved, read_only=read_only, export=export, layer=layer)
        size = os.lseek(fd, 0, os.SEEK_END) if block_device else info.st_size
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(resolved, fd, size, block_device, read_only, (info.st_dev, info.st_ino))


def _lock(fd: int, resolved: Path, *, read_only: bool, export: str, layer: int) -> None:
    try:
        lock_image(fd, writable=not read_only)
    except LockConflict as err:
        raise ChainRefused(export, layer, str(resolved), "locked", str(err)) from err
