"""Sans-I/O parser for the transmission phase: bytes in, `Request`s out.

It owns the receive buffer so that the asyncio glue (a BufferedProtocol) can
receive straight into it: headers land in a reusable scratch buffer, and a large
WRITE payload is received directly into its own buffer without another copy.
A WRITE longer than the maximum payload is not buffered: its payload is skipped
as it arrives so that the stream stays framed, and the request is flagged.
While a payload arrives, `partial_write()` tells how much of it is already here,
so the server can write a large payload in parts instead of waiting for all of it.
"""

from __future__ import annotations

from nbdguard.protocol import wire
from nbdguard.protocol.constants import REQUEST_MAGIC, Command

SCRATCH_SIZE = 256 * 1024
DIRECT_THRESHOLD = 64 * 1024  # payload remainders at least this big skip the scratch buffer
_HEADER = wire.REQUEST
_HEADER_SIZE = _HEADER.size


class ProtocolViolation(Exception):
    """The peer broke framing; the only safe answer is to drop the connection."""


class Request:
    """One transmission request; `payload` holds WRITE data."""

    __slots__ = ("command", "cookie", "flags", "length", "offset", "oversized", "payload")

    def __init__(self, flags: int, command: int, cookie: int, offset: int, length: int) -> None:
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
        # WRITE data. From buffer_updated() it may be a view of the parser's buffers, valid
        # until the next get_buffer(): serve the request before receiving more.
        self.payload: bytes | bytearray | memoryview | None = None
        self.oversized = False  # a WRITE whose payload exceeded the maximum and was skipped

    def __repr__(self) -> str:
        return (
            f"Request(command={self.command}, flags={self.flags:#x}, cookie={self.cookie:#x}, "
            f"offset={self.offset}, length={self.length}, oversized={self.oversized})"
        )


class RequestParser:
    """Frames requests; see module docstring for the buffering strategy."""

    def __init__(self, max_payload: int) -> None:
        self._max_payload = max_payload
        self._scratch = bytearray(SCRATCH_SIZE)
        self._view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._pending: Request | None = None  # a WRITE waiting for payload
        self._filled = 0  # payload bytes received (or skipped) so far
        self._direct = False  # the last get_buffer() handed out the payload buffer
        # One payload buffer reused across WRITEs (no allocation, no fresh pages to fault in);
        # at most one request per buffer_updated() call may use it.
        self._reusable = bytearray()
        self._reusable_taken = False
        self._pending_reusable = False

    @property
    def awaiting_payload(self) -> bool:
        return self._pending is not None

    def partial_write(self) -> tuple[Request, int] | None:
        """The WRITE whose payload is still arriving and how many of its bytes have: that
        prefix of `payload` is final and stays put until the request completes, so it can be
        written before the rest arrives. None when no payload is pending or it is skipped."""
        pending = self._pending
        if pending is None or pending.payload is None:
            return None
        return pending, self._filled

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should go."""
        pending = self._pending
        if pending is not None and not pending.oversized and pending.payload is not None:
            remaining = pending.length - self._filled
            if remaining >= DIRECT_THRESHOLD:
                self._direct = True
                return memoryview(pending.payload)[self._filled :]
        self._direct = False
        if self._start == self._end:
            self._start = self._end = 0
        elif SCRATCH_SIZE - self._end < DIRECT_THRESHOLD:
            size = self._end - self._start
            self._scratch[:size] = self._scratch[self._start : self._end]
            self._start, self._end = 0, size
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Request]:
        """Account for `nbytes` written into the last buffer; return completed requests.

        WRITE payloads may be views of the parser's buffers: they are valid until the next
        get_buffer() call.
        """
        completed: list[Request] = []
        self._reusable_taken = self._pending is not None and self._pending_reusable
        if self._direct:
            self._direct = False
            self._filled += nbytes
            self._complete_payload(completed)
            return completed
        self._end += nbytes
        self._parse(completed)
        return completed

    def receive(self, data: bytes | bytearray | memoryview) -> list[Request]:
        """Feed bytes by copying them through get_buffer (tests and slow paths)."""
        completed: list[Request] = []
        source = memoryview(data).cast("B")
        while source:
            target = self.get_buffer()
            count = min(len(target), len(source))
            target[:count] = source[:count]
            source = source[count:]
            completed += self.buffer_updated(count)
        for request in completed:  # detach from the parser's buffers: callers may keep them
            if request.payload is not None:
                request.payload = bytes(request.payload)
        return completed

    def _parse(self, completed: list[Request]) -> None:
        scratch = self._scratch
        while True:
            if self._pending is not None:
                self._take_payload_from_scratch()
                if not self._complete_payload(completed):
                    return
            start = self._start
            if self._end - start < _HEADER_SIZE:
                return
            magic, flags, command, cookie, offset, length = _HEADER.unpack_from(scratch, start)
            self._start = start + _HEADER_SIZE
            if magic != REQUEST_MAGIC:
                raise ProtocolViolation(f"bad request magic {magic:#x}")
            request = Request(flags, command, cookie, offset, length)
            if command != Command.WRITE or not length:
                completed.append(request)
            elif length <= self._end - self._start and length <= self._max_payload:
                # The whole payload is already here: hand out a view, copy nothing.
                request.payload = self._view[self._start : self._start + length]
                self._start += length
                completed.append(request)
            else:
                self._begin_payload(request)

    def _begin_payload(self, request: Request) -> None:
        self._pending_reusable = False
        if request.length > self._max_payload:
            request.oversized = True
        elif self._reusable_taken:
            request.payload = bytearray(request.length)
        else:
            if len(self._reusable) < request.length:
                self._reusable = bytearray(request.length)  # views of the old one stay valid
            request.payload = memoryview(self._reusable)[: request.length]
            self._reusable_taken = self._pending_reusable = True
        self._pending = request
        self._filled = 0

    def _take_payload_from_scratch(self) -> None:
        request = self._pending
        assert request is not None
        count = min(request.length - self._filled, self._end - self._start)
        if count and request.payload is not None:
            start = self._start
            target = memoryview(request.payload)
            target[self._filled : self._filled + count] = self._view[start : start + count]
        self._start += count
        self._filled += count

    def _complete_payload(self, completed: list[Request]) -> bool:
        request = self._pending
        assert request is not None
        if self._filled < request.length:
            return False
        self._pending = None
        completed.append(request)
        return True
