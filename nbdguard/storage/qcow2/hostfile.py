"""Byte access to one file of a qcow2 layer (the image itself or its external data file).

Reads are zero-copy slices of a read-only shared mapping, exactly like raw exports; writes
use pwrite (ENOSPC, not SIGBUS, on a full disk) and the page cache keeps both coherent. A
writable file grows as clusters are allocated: bytes past the mapping are read with pread
until the mapping is renewed, which happens once the file has grown by a quarter.
"""

from __future__ import annotations

import mmap
import os

from nbdguard.storage import fileops
from nbdguard.storage.device import Buffer
from nbdguard.storage.pinned import OpenedFile


class HostFile:
    def __init__(self, file: OpenedFile) -> None:
        self.file = file
        self.fd = file.fd
        self.size = file.size
        self._map: mmap.mmap | None = None
        self._view = memoryview(b"")
        self._remap()

    def _remap(self) -> None:
        """Map the whole file; the old mapping goes when no reply references it any more."""
        if not self.size:
            return
        self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._view = memoryview(self._map)

    def read(self, offset: int, length: int) -> Buffer:
        """`length` bytes at `offset`; bytes past the end of the file read as zeros."""
        if self.size > len(self._view) * 5 // 4:
            self._remap()
        if offset + length <= len(self._view):
            return self._view[offset : offset + length]
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def read_into(self, target: memoryview, offset: int) -> None:
        if offset + len(target) <= len(self._view):
            target[:] = self._view[offset : offset + len(target)]
            return
        got = os.preadv(self.fd, [target], offset)
        if got < len(target):
            target[got:] = bytes(len(target) - got)

    def write(self, data: Buffer, offset: int) -> None:
        view = memoryview(data)
        end = offset + len(view)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written
        self.size = max(self.size, end)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        fileops.unmap(self._view, self._map)
