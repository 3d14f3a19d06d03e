"""A WRITE's payload on its way to the device, piece by piece as the parser hands it out.

Where the device allows (`partial_write_unit`), arrived bytes are written in parts that end
on the device's unit, so a qcow2 part allocates and copies on write exactly what the whole
write would, and the client refills the socket while we write. Where the write must be seen
whole (one that touches sector 0 under the guard), pieces are gathered as they arrive:
memory follows what was sent, never what a header announced. `held` is what this write has
copied and not yet written, for the connection's byte budget.

A failed part is remembered and raised when the last piece comes (the payload must still be
received to keep the stream framed); nothing more of the write is written after a failure.
A client that leaves mid-payload may leave such a write partly applied, as NBD allows for a
write it was never answered.
"""

from __future__ import annotations

import mmap

from nbdguard.protocol.constants import NBDError
from nbdguard.protocol.transmission import Request
from nbdguard.storage.device import BlockDevice, Buffer

PART_WRITE_MIN = 64 * 1024  # arrived bytes are written once this many are new
MAPPED_GATHER = 1 << 20  # a write gathered whole from this long is gathered into a mapping


class IncomingWrite:
    """One WRITE from its header to its last piece."""

    __slots__ = (
        "_carry",
        "_gathered",
        "_mapping",
        "error",
        "failure",
        "request",
        "started",
        "unit",
        "written",
    )

    def __init__(self, request: Request, started: float, error: NBDError, unit: int) -> None:
        self.request = request
        self.started = started
        self.error = error  # the request's validation verdict: not OK, the payload is dropped
        self.unit = unit  # 0: written whole, at the end
        self.written = 0  # payload bytes already on the device
        self._carry = bytearray()  # the bytes after `written` received and not yet written
        self.failure: Exception | None = None
        self._mapping: mmap.mmap | None = None  # where a long write is gathered whole
        self._gathered = 0

    @property
    def held(self) -> int:
        return len(self._carry) + self._gathered

    def add(self, device: BlockDevice, data: memoryview) -> None:
        """Take a piece that is not the last: write what may be written, keep the rest."""
        if self.error or self.failure is not None:
            return
        if not self.unit:
            self._gather(data)
            return
        base = self.request.offset + self.written
        carried = len(self._carry)
        end = (base + carried + len(data)) // self.unit * self.unit - base
        if end < PART_WRITE_MIN:
            self._carry += data
            return
        if carried >= end:
            self._carry += data  # rare (a piece shorter than the carried bytes): copying is fine
            self._part(device, self._carry[:end])
            if self.failure is None:
                del self._carry[:end]
            return
        used = 0
        if carried:  # complete the carried bytes to a boundary, write them, go on from data
            used = -(base + carried) % self.unit
            self._carry += data[:used]
            self._part(device, self._carry)
            self._carry = bytearray()
            if self.failure is not None:
                return
        stop = end - carried
        if stop > used:
            self._part(device, data[used:stop])
        if self.failure is None:
            self._carry = bytearray(data[stop:])

    def rest(self, data: memoryview) -> Buffer:
        """The last piece came: everything not yet written, as one buffer to write at
        `request.offset + written` (raises the failure of an earlier part)."""
        if self.failure is not None:
            raise self.failure
        if self._mapping is not None:
            self._gather(data)
            return memoryview(self._mapping)[: self._gathered]
        if not self._carry:
            return data
        self._carry += data
        return self._carry

    def _gather(self, data: memoryview) -> None:
        """Keep a piece of a write that must be whole. A long one goes into an anonymous
        mapping of its length, whose pages are only backed as bytes land in them: memory
        follows what arrived, grows without copying, and goes back to the kernel when the
        write is done (a growing heap buffer would be copied as it grows, and fragment the
        heap so that its high-water mark outlives it)."""
        if self._mapping is None and self.request.length >= MAPPED_GATHER:
            self._mapping = mmap.mmap(-1, self.request.length)
        mapping = self._mapping
        if mapping is None:
            self._carry += data
            return
        end = self._gathered + len(data)
        mapping[self._gathered : end] = data
        self._gathered = end

    def _part(self, device: BlockDevice, data: Buffer) -> None:
        try:
            device.pwrite(data, self.request.offset + self.written)
        except Exception as exc:
            self.failure = exc
            self._carry = bytearray()
            return
        self.written += len(data)
