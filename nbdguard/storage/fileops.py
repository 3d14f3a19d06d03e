"""Thin wrappers over Linux file calls the standard library does not expose.

`fallocate(2)` with mode flags is reached through ctypes (os.posix_fallocate
cannot punch holes); SEEK_DATA/SEEK_HOLE extents come from os.lseek.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from nbdguard.storage.device import DATA, HOLE_ZERO, Extent

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError with the call's errno."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)


def write_zero_bytes(fd: int, offset: int, length: int, chunk: int = 1 << 20) -> None:
    """The slow, always-correct way to zero a range."""
    zeros = bytes(min(chunk, length))
    end = offset + length
    while offset < end:
        count = min(len(zeros), end - offset)
        written = os.pwrite(fd, memoryview(zeros)[:count], offset)
        offset += written


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite until every byte is written (one call in the usual case, no views made)."""
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    offset += written
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def read_exactly(fd: int, offset: int, length: int) -> bytes:
    """pread that fails (EIO) rather than return fewer bytes: a short read means the file
    shrank under us, and a reply must never carry fewer bytes than it announces."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, f"file ends before offset {offset + length}")
        data += more
    return data


def extents(fd: int, offset: int, length: int, max_extents: int) -> list[Extent]:
    """Data/hole extents of `fd` within [offset, offset+length) from SEEK_DATA/SEEK_HOLE."""
    end = offset + length
    result: list[Extent] = []
    pos = offset
    while pos < end and len(result) < max_extents:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data at or after pos
                data = end
            elif err.errno in UNSUPPORTED:
                return [(length, DATA)]
            else:
                raise
        if data > pos:
            stop = min(data, end)
            result.append((stop - pos, HOLE_ZERO))
            pos = stop
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        stop = min(hole, end)
        result.append((stop - pos, DATA))
        pos = stop
    return _merge(result)


def _merge(items: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for length, flags in items:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + length, flags)
        else:
            merged.append((length, flags))
    return merged
