"""The one interface every export layer implements, and a pass-through base for layers.

Methods are synchronous and run on the event loop thread, except `flush`, which
the dispatcher may run in a worker thread: implementations must make `flush` safe
to call concurrently with the other methods. Inputs are validated before they
get here (range, read-only, flags), so layers assert rather than re-check.
Failures are `OSError`s carrying the errno the client should see.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from nbdguard.protocol.constants import AllocationFlag

Buffer = bytes | bytearray | memoryview
Extent = tuple[int, int]  # (length, AllocationFlag bits)

DATA = 0
HOLE_ZERO = int(AllocationFlag.HOLE | AllocationFlag.ZERO)


class FileRange:
    """Device bytes that are, unchanged, bytes of one open file. A reply can carry this
    instead of the bytes: the connection sends it with sendfile(2) from the page cache,
    never mapping or copying it into the process.

    A reply may wait before it is sent. Where the file's bytes can meanwhile stop being
    these device bytes (a qcow2 cluster freed and given to another guest offset), the
    device supplies `recheck`: called just before the file is read, it returns None if
    the range still holds the device's bytes, else the device's bytes as they are now."""

    __slots__ = ("fd", "length", "offset", "recheck")

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        recheck: Callable[[], Buffer | None] | None = None,
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.recheck = recheck

    def __repr__(self) -> str:
        return f"FileRange(fd={self.fd}, offset={self.offset}, length={self.length})"


class WouldBlock(Exception):
    """Raised by a device method that cannot finish without waiting (another process holds
    a lock it needs, say). Nothing has been done; `retry` does the same operation, waiting
    as long as it may (it raises OSError(EIO) past its bound), and is meant for a worker
    thread: the caller runs it there and answers the request when it returns. `retry` owns
    what it needs (a write's data is copied), so the caller's buffers may be reused."""

    def __init__(self, retry: Callable[[], None], reason: str) -> None:
        super().__init__(reason)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device can do; the server derives transmission flags from it."""

    read_only: bool
    multi_conn: bool  # writes and flushes are visible across connections
    fast_zero: bool  # write_zeroes(fast=True) can ever succeed
    sparse_reads: bool  # block_status can report holes cheaply


class BlockDevice(ABC):
    """A byte-addressed device of fixed size."""

    size: int
    capabilities: Capabilities

    @abstractmethod
    def pread(self, offset: int, length: int) -> Buffer:
        """Return `length` bytes at `offset`; may be a view the caller must not keep long."""

    def read_range(self, offset: int, length: int) -> FileRange | None:
        """The file range holding exactly these bytes, if there is one (else use pread)."""
        return None

    @abstractmethod
    def pwrite(self, data: Buffer, offset: int) -> None: ...

    def partial_write_unit(self, offset: int) -> int:
        """Whether a write starting at `offset` may be applied as several pwrites, each part
        as soon as it arrives: 0 if it must be seen whole (to be checked, say), else the
        device offsets parts should end on (a multiple of it) to cost no more than the
        whole. The default is 0."""
        return 0

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        """Zero a range; with `fast`, raise ENOTSUP rather than write zeroes slowly."""

    @abstractmethod
    def trim(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def cache(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def block_status(self, offset: int, length: int, max_extents: int) -> list[Extent]:
        """Extents covering a prefix (at least one byte) of the range, at most `max_extents`."""

    def allocation_depth(self, offset: int, length: int, max_extents: int) -> list[Extent]:
        """qemu:allocation-depth extents: (length, depth), depth 1 for this layer, 2 for the
        one below it, ..., 0 where no layer holds the bytes. A device without layers below
        holds everything."""
        return [(length, 1)]

    @abstractmethod
    def close(self) -> None: ...


class Layer(BlockDevice):
    """A device that wraps another and overrides only what it changes."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.capabilities = inner.capabilities
        # What this layer does not override calls the inner device directly: a layer adds
        # no Python frame to the requests it passes through (reads, under the guard).
        for name in _PASS_THROUGH:
            if getattr(type(self), name) is getattr(Layer, name):
                setattr(self, name, getattr(inner, name))

    def pread(self, offset: int, length: int) -> Buffer:
        return self.inner.pread(offset, length)

    def read_range(self, offset: int, length: int) -> FileRange | None:
        return self.inner.read_range(offset, length)

    def pwrite(self, data: Buffer, offset: int) -> None:
        self.inner.pwrite(data, offset)

    def partial_write_unit(self, offset: int) -> int:
        return self.inner.partial_write_unit(offset)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast)

    def trim(self, offset: int, length: int) -> None:
        self.inner.trim(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def block_status(self, offset: int, length: int, max_extents: int) -> list[Extent]:
        return self.inner.block_status(offset, length, max_extents)

    def allocation_depth(self, offset: int, length: int, max_extents: int) -> list[Extent]:
        return self.inner.allocation_depth(offset, length, max_extents)

    def close(self) -> None:
        self.inner.close()


_PASS_THROUGH = tuple(
    name for name in vars(Layer) if not name.startswith("_") and callable(vars(Layer)[name])
)
