"""The sector-zero guard: a layer over a raw image that never lets sector 0 become
an image-format header.

Every request that can change bytes 0-511 becomes a read-modify-write of the whole
sector on a private copy: the current sector is read, the request's bytes (or
zeroes) are applied, and the result is checked against the rule set. A match
refuses the whole request with EPERM and writes nothing; otherwise exactly the
checked bytes are written, then the rest of the request. Requests that start at
or beyond byte 512 pass straight through and pay nothing.

The check and the write happen under an export-wide lock (all connections of an
export share this layer) and an OFD byte-range lock on the start of the file, so
no two writers can each supply half of a header. Neither lock is ever waited for on
the event loop: when one is held the request is retried in a worker thread, which
waits a bounded time and then fails the request with EIO.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nbdguard.guard.signatures import detect_header
from nbdguard.storage.device import BlockDevice, Buffer, Layer, WouldBlock

SECTOR = 512


class HeaderWriteBlocked(OSError):
    """A request would have made sector 0 look like an image-format header. The guard
    reports it itself (audit event, metric) and marks it `reported`: whoever serves the
    request only answers EPERM."""

    def __init__(self, detected_format: str, sector_head: bytes) -> None:
        super().__init__(errno.EPERM, f"write would create a {detected_format} header in sector 0")
        self.format = detected_format
        self.sector_head = sector_head  # first 16 bytes of the refused sector, for the audit log
        self.reported = False


# (refusal, command, offset, length): the audit hook, given the request that was refused
BlockedReport = Callable[[HeaderWriteBlocked, str, int, int], None]


def _unreported(blocked: HeaderWriteBlocked, command: str, offset: int, length: int) -> None:
    pass


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    rule_set: str  # "qemu" or "strict"
    allowed: frozenset[str] = frozenset()

    def detect(self, sector: Buffer) -> str | None:
        return detect_header(sector, self.rule_set, self.allowed)


Patch = Callable[[bytearray, int, int], None]  # (sector, start, stop): apply the request there


class FileLock(Protocol):
    """The lock other processes honour on the start of the file (locks.SectorLock)."""

    wait: float

    def try_acquire(self) -> bool: ...
    def acquire(self, deadline: float) -> None: ...
    def release(self) -> None: ...


class _NoFileLock:
    wait = 0.0

    def try_acquire(self) -> bool:
        return True

    def acquire(self, deadline: float) -> None:
        pass

    def release(self) -> None:
        pass


class Sector0Guard(Layer):
    def __init__(
        self,
        inner: BlockDevice,
        policy: GuardPolicy,
        *,
        file_lock: FileLock | None = None,
        on_rmw: Callable[[], None] = lambda: None,
        on_lock_timeout: Callable[[], None] = lambda: None,
        on_blocked: BlockedReport = _unreported,
    ) -> None:
        super().__init__(inner)
        self._on_blocked = on_blocked
        self.policy = policy
        self._lock = threading.Lock()
        self._file_lock: FileLock = file_lock or _NoFileLock()
        self._on_rmw = on_rmw
        self._on_lock_timeout = on_lock_timeout
        self._sector_size = min(SECTOR, inner.size)

    def existing_header(self) -> str | None:
        """The format sector 0 already matches (checked when the export opens)."""
        return self.policy.detect(bytes(self.inner.pread(0, self._sector_size)))

    def pwrite(self, data: Buffer, offset: int) -> None:
        if offset >= SECTOR:
            self.inner.pwrite(data, offset)
            return
        self._locked(
            lambda: self._write_head(data, offset), lambda: self._owned_write(data, offset)
        )

    def _owned_write(self, data: Buffer, offset: int) -> Callable[[], None]:
        """The same write over a copy of its data: the caller may reuse its buffer."""
        copy = bytes(data)
        return lambda: self._write_head(copy, offset)

    def _write_head(self, data: Buffer, offset: int) -> None:
        view = memoryview(data)
        stop = min(offset + len(view), self._sector_size)

        def patch(sector: bytearray, start: int, end: int) -> None:
            sector[start:end] = view[: end - start]

        self._check_and_write(patch, offset, stop, ("write", offset, len(view)))
        if len(view) > stop - offset:
            self.inner.pwrite(view[stop - offset :], stop)

    def partial_write_unit(self, offset: int) -> int:
        """Only writes that start past sector 0: one that touches it is checked whole, so that
        a refusal leaves every byte of it unwritten."""
        return self.inner.partial_write_unit(offset) if offset >= SECTOR else 0

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        if offset >= SECTOR:
            self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast)
            return

        def zero_head() -> None:
            stop = min(offset + length, self._sector_size)
            self._check_and_write(_zero, offset, stop, ("write_zeroes", offset, length))
            if offset + length > stop:
                rest = offset + length - stop
                self.inner.write_zeroes(stop, rest, may_trim=may_trim, fast=fast)

        self._locked(zero_head, lambda: zero_head)

    def trim(self, offset: int, length: int) -> None:
        """A trimmed sector 0 reads back as zeroes here, so it is checked (and written) so."""
        if offset >= SECTOR:
            self.inner.trim(offset, length)
            return

        def trim_head() -> None:
            stop = min(offset + length, self._sector_size)
            self._check_and_write(_zero, offset, stop, ("trim", offset, length))
            if offset + length > stop:
                self.inner.trim(stop, offset + length - stop)

        self._locked(trim_head, lambda: trim_head)

    def _locked(self, work: Callable[[], None], owned: Callable[[], Callable[[], None]]) -> None:
        """Run `work` under the export's lock and the file lock, if both are free now. If
        either is held, nothing is done and WouldBlock hands the caller a retry that waits
        for them (bounded) in a worker thread, so a local process holding a lock on the
        file's first bytes never stalls the event loop."""
        if self._lock.acquire(blocking=False):
            try:
                if self._file_lock.try_acquire():
                    try:
                        work()
                    finally:
                        self._file_lock.release()
                    return
            finally:
                self._lock.release()
        retry = owned()
        raise WouldBlock(lambda: self._wait_then(retry), "sector 0 is locked")

    def _wait_then(self, work: Callable[[], None]) -> None:
        deadline = time.monotonic() + self._file_lock.wait
        if not self._lock.acquire(timeout=max(self._file_lock.wait, 0.001)):
            self._on_lock_timeout()
            raise OSError(errno.EIO, "sector 0 is busy: gave up waiting for the guard's lock")
        try:
            try:
                self._file_lock.acquire(deadline)
            except OSError:
                self._on_lock_timeout()
                raise
            try:
                work()
            finally:
                self._file_lock.release()
        finally:
            self._lock.release()

    def _check_and_write(
        self, patch: Patch, start: int, stop: int, request: tuple[str, int, int]
    ) -> None:
        """Read sector 0, apply the request to a private copy, refuse a header (reported
        with `request`: command, offset, length), write the checked bytes. The caller holds
        the locks and writes the rest of the request."""
        original = bytes(self.inner.pread(0, self._sector_size))
        sector = bytearray(original)
        patch(sector, start, stop)
        if sector != original:
            detected = self.policy.detect(sector)
            if detected is not None:
                raise report_refusal(self._on_blocked, detected, sector, request)
            self.inner.pwrite(sector, 0)
        self._on_rmw()


def report_refusal(
    on_blocked: BlockedReport, detected: str, sector: bytearray, request: tuple[str, int, int]
) -> HeaderWriteBlocked:
    """The refusal of `request` (command, offset, length), reported through `on_blocked`."""
    blocked = HeaderWriteBlocked(detected, bytes(sector[:16]))
    on_blocked(blocked, *request)
    blocked.reported = True
    return blocked


def _zero(sector: bytearray, start: int, stop: int) -> None:
    sector[start:stop] = bytes(stop - start)
