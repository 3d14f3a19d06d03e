"""The raw format driver: the image's bytes are the device's bytes.

Large reads leave as file ranges that the connection sends with sendfile(2): no copy
in the process and nothing mapped, so memory stays the server's own however much of
the image is read. Small reads are one pread (cheaper than a sendfile per reply when
many replies share one writev). Nothing is mapped, so a file truncated behind our
back gives EIO, never SIGBUS.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from nbdguard.storage import fileops
from nbdguard.storage.device import BlockDevice, Buffer, Capabilities, Extent, FileRange
from nbdguard.storage.pinned import OpenedFile

ZeroingCall = Callable[[int, int, int], None]  # (fd, offset, length)


class RawImage(BlockDevice):
    def __init__(self, file: OpenedFile) -> None:
        self.file = file
        self.size = file.size
        self._fd = file.fd
        self._unsupported: set[ZeroingCall] = set()
        self.capabilities = Capabilities(
            read_only=file.read_only, multi_conn=True, fast_zero=True, sparse_reads=True
        )

    def pread(self, offset: int, length: int) -> Buffer:
        return fileops.read_exactly(self._fd, offset, length)

    def read_range(self, offset: int, length: int) -> FileRange:
        return FileRange(self._fd, offset, length)

    def pwrite(self, data: Buffer, offset: int) -> None:
        fileops.write_all(self._fd, data, offset)

    def partial_write_unit(self, offset: int) -> int:
        """Bytes are bytes: parts written in order make the whole, wherever they end, so
        each arrived piece is written as it is (aligning parts on pages cost a second
        pwrite and a copy per piece, for the page cache nothing)."""
        return 1

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        if may_trim and self._try_fallocate(fileops.punch_hole, offset, length):
            return
        if self._try_fallocate(fileops.zero_range, offset, length):
            return
        if fast:
            raise OSError(errno.ENOTSUP, "zeroing this range would not be fast")
        fileops.write_zero_bytes(self._fd, offset, length)

    def trim(self, offset: int, length: int) -> None:
        # Advisory: where holes are unsupported there is nothing to do.
        self._try_fallocate(fileops.punch_hole, offset, length)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def block_status(self, offset: int, length: int, max_extents: int) -> list[Extent]:
        return fileops.extents(self._fd, offset, length, max_extents)

    def close(self) -> None:
        self.file.close()

    def _try_fallocate(self, operation: ZeroingCall, offset: int, length: int) -> bool:
        """Run one fallocate mode; where the file system lacks it, remember and say False."""
        if operation in self._unsupported:
            return False
        try:
            operation(self._fd, offset, length)
        except OSError as err:
            if err.errno not in fileops.UNSUPPORTED:
                raise
            self._unsupported.add(operation)
            return False
        return True
