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
no two writers can each supply half of a header.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from nbdguard.guard.signatures import detect_header
from nbdguard.storage.device import BlockDevice, Buffer, Layer

SECTOR = 512


class HeaderWriteBlocked(OSError):
    """A request would have made sector 0 look like an image-format header."""

    def __init__(self, detected_format: str, sector_head: bytes) -> None:
        super().__init__(errno.EPERM, f"write would create a {detected_format} header in sector 0")
        self.format = detected_format
        self.sector_head = sector_head  # first 16 bytes of the refused sector, for the audit log


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    rule_set: str  # "qemu" or "strict"
    allowed: frozenset[str] = frozenset()

    def detect(self, sector: Buffer) -> str | None:
        return detect_header(sector, self.rule_set, self.allowed)


Patch = Callable[[bytearray, int, int], None]  # (sector, start, stop): apply the request there


class Sector0Guard(Layer):
    def __init__(
        self,
        inner: BlockDevice,
        policy: GuardPolicy,
        *,
        file_lock: Callable[[], AbstractContextManager[object]] | None = None,
        on_rmw: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(inner)
        self.policy = policy
        self._lock = threading.Lock()
        self._file_lock = file_lock or nullcontext
        self._on_rmw = on_rmw
        self._sector_size = min(SECTOR, inner.size)

    def existing_header(self) -> str | None:
        """The format sector 0 already matches (checked when the export opens)."""
        return self.policy.detect(bytes(self.inner.pread(0, self._sector_size)))

    def pwrite(self, data: Buffer, offset: int) -> None:
        if offset >= SECTOR:
            self.inner.pwrite(data, offset)
            return
        view = memoryview(data)
        stop = min(offset + len(view), self._sector_size)

        def patch(sector: bytearray, start: int, end: int) -> None:
            sector[start:end] = view[: end - start]

        with self._guarded(patch, offset, stop):
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
        stop = min(offset + length, self._sector_size)
        with self._guarded(_zero, offset, stop):
            if offset + length > stop:
                rest = offset + length - stop
                self.inner.write_zeroes(stop, rest, may_trim=may_trim, fast=fast)

    def trim(self, offset: int, length: int) -> None:
        """A trimmed sector 0 reads back as zeroes here, so it is checked (and written) so."""
        if offset >= SECTOR:
            self.inner.trim(offset, length)
            return
        stop = min(offset + length, self._sector_size)
        with self._guarded(_zero, offset, stop):
            if offset + length > stop:
                self.inner.trim(stop, offset + length - stop)

    @contextmanager
    def _guarded(self, patch: Patch, start: int, stop: int) -> Iterator[None]:
        """Check-and-write sector 0; the body (the rest of the request) runs under the locks."""
        with self._lock, self._file_lock():
            original = bytes(self.inner.pread(0, self._sector_size))
            sector = bytearray(original)
            patch(sector, start, stop)
            if sector != original:
                detected = self.policy.detect(sector)
                if detected is not None:
                    raise HeaderWriteBlocked(detected, bytes(sector[:16]))
                self.inner.pwrite(sector, 0)
            self._on_rmw()
            yield


def _zero(sector: bytearray, start: int, stop: int) -> None:
    sector[start:stop] = bytes(stop - start)
