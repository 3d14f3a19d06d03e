"""Image locks that QEMU understands, so qemu-img, qemu-nbd and a second nbdguard
see that an image is in use.

QEMU's convention (block/file-posix.c): open-file-description (OFD) read locks on
byte 100+n for each permission n the holder uses, and on byte 200+n for each
permission it refuses to share. A conflict is another description holding a lock
on the byte we test. nbdguard holds "consistent read" (and "write" and "resize"
when writable) and refuses to share "write" and "resize": any number of readers,
or one writer, but never a writer next to anyone else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE, GRAPH_MOD = range(5)
ALL_PERMS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE, GRAPH_MOD)
_PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "graph mod")

# struct flock on Linux x86_64/aarch64: short type, short whence, off_t start, off_t len, pid_t pid
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


class LockConflict(OSError):
    """Another process holds the image in a way that excludes us."""


def _flock(fd: int, command: int, kind: int, start: int, length: int = 1) -> int:
    request = _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
    reply = fcntl.fcntl(fd, command, request)
    return int(_FLOCK.unpack(reply)[0])


def _held_elsewhere(fd: int, byte: int) -> bool:
    return _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def lock_image(fd: int, *, writable: bool) -> None:
    """Take QEMU-style locks on `fd`; raise LockConflict if someone else forbids us."""
    used = {CONSISTENT_READ, WRITE, RESIZE} if writable else {CONSISTENT_READ}
    unshared = {WRITE, RESIZE}
    try:
        for perm in used:
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + perm)
        for perm in unshared:
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + perm)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            _conflict("another process holds a conflicting lock")
        raise
    for perm in used:
        if _held_elsewhere(fd, SHARED_BASE + perm):
            _conflict(f"another process does not share the {_PERM_NAMES[perm]} permission")
    for perm in unshared:
        if _held_elsewhere(fd, PERM_BASE + perm):
            _conflict(f"another process holds the {_PERM_NAMES[perm]} permission")


def _conflict(message: str) -> None:
    raise LockConflict(errno.EAGAIN, f"image is locked: {message}")


SECTOR_LOCK_END = PERM_BASE  # bytes 100+ carry the permission locks above
SECTOR_LOCK_WAIT = 5.0  # seconds a sector-0 write waits for another process's lock


class SectorLock:
    """An OFD write lock over bytes 0-99, held while sector 0 is read, checked and written.

    Another process following the same convention cannot interleave its own
    read-modify-write of sector 0. The lock stops short of byte 100 because a write
    lock over the permission bytes would replace our own read locks there. Nothing here
    blocks without a bound: the event loop only tries (`try_acquire`), and a worker
    thread waits at most `wait` seconds (`acquire`), because any local process may hold a
    lock on these bytes for as long as it likes.
    """

    def __init__(self, fd: int, wait: float = SECTOR_LOCK_WAIT) -> None:
        self.fd = fd
        self.wait = wait

    def try_acquire(self) -> bool:
        try:
            _flock(self.fd, _F_OFD_SETLK, fcntl.F_WRLCK, 0, SECTOR_LOCK_END)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def acquire(self, deadline: float) -> None:
        """Poll until the lock is ours or `deadline` (time.monotonic) passes: EIO then."""
        pause = 0.001
        while not self.try_acquire():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SectorLockTimeout(
                    errno.EIO, "sector 0 is locked by another process: gave up waiting"
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    def release(self) -> None:
        _flock(self.fd, _F_OFD_SETLK, fcntl.F_UNLCK, 0, SECTOR_LOCK_END)


class SectorLockTimeout(OSError):
    """Sector 0 stayed locked by another process for longer than a write may wait."""
