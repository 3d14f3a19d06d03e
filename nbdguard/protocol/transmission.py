"""Sans-I/O parser for the transmission phase: bytes in, events out.

Two events, after h11's body events:
- `Request`: one request's header;
- `Data`: a piece of a WRITE's payload, as it arrived; the last piece is `final` (a WRITE of
  no bytes gets one empty final piece), so every WRITE ends with exactly one final piece.

The parser owns one receive buffer, and the asyncio glue (a BufferedProtocol) receives
straight into it, so a payload piece is a view of the bytes as they came off the socket,
never a copy. A piece *leases* its bytes: until its consumer calls `release()`, the parser
never hands out that memory again (when it would, it moves to a fresh buffer). Holding
pieces across receives therefore costs an allocation, never another request's bytes.
Nothing is allocated for what a header announces: a 32 MiB WRITE costs the parser its
receive buffer and no more; what must be whole is the consumer's to gather, and to count.
Framing is all the parser checks; validating a request is the consumer's, once.
"""

from __future__ import annotations

from nbdguard.protocol import wire
from nbdguard.protocol.constants import REQUEST_MAGIC, Command

RECEIVE_BUFFER = 256 * 1024
MIN_ROOM = 64 * 1024  # a receive is offered at least this much room
_HEADER = wire.REQUEST
_HEADER_SIZE = _HEADER.size
_WRITE = int(Command.WRITE)
_EMPTY = memoryview(b"")


class ProtocolViolation(Exception):
    """The peer broke framing; the only safe answer is to drop the connection."""


class Request:
    """One transmission request's header."""

    __slots__ = ("command", "cookie", "flags", "length", "offset")

    def __init__(self, flags: int, command: int, cookie: int, offset: int, length: int) -> None:
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length

    def __repr__(self) -> str:
        return (
            f"Request(command={self.command}, flags={self.flags:#x}, cookie={self.cookie:#x}, "
            f"offset={self.offset}, length={self.length})"
        )


class _Buffer:
    """A receive buffer and how many bytes of it live pieces still view."""

    __slots__ = ("data", "leased", "view")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.leased = 0


class Data:
    """A piece of `request`'s payload: bytes [at, at + len(data)) of it."""

    __slots__ = ("_buffer", "at", "data", "final", "request")

    def __init__(
        self, request: Request, at: int, data: memoryview, final: bool, buffer: _Buffer | None
    ) -> None:
        self.request = request
        self.at = at
        self.data = data
        self.final = final
        self._buffer = buffer

    def release(self) -> None:
        """The consumer is done with `data` (written or copied); safe to call twice."""
        buffer = self._buffer
        if buffer is not None:
            self._buffer = None
            buffer.leased -= len(self.data)

    def __repr__(self) -> str:
        cookie, length = self.request.cookie, len(self.data)
        return f"Data(cookie={cookie:#x}, at={self.at}, length={length}, final={self.final})"


Event = Request | Data


class RequestParser:
    """Frames requests; see the module docstring for the buffering and the leases."""

    def __init__(self, buffer_size: int = RECEIVE_BUFFER) -> None:
        self._size = buffer_size
        self._buffer = _Buffer(buffer_size)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # end of the bytes received
        self._pending: Request | None = None  # a WRITE whose payload is arriving
        self._filled = 0  # payload bytes of it already handed out

    @property
    def awaiting_payload(self) -> bool:
        return self._pending is not None

    @property
    def leased(self) -> int:
        """Bytes of the current receive buffer that unreleased pieces view."""
        return self._buffer.leased

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should go: after the unparsed ones, in room that
        no live piece views."""
        buffer = self._buffer
        if self._start == self._end and not buffer.leased:  # all parsed, all released
            self._start = self._end = 0
            return buffer.view
        if self._size - self._end >= MIN_ROOM:
            return buffer.view[self._end :]
        unparsed = self._end - self._start
        if buffer.leased:  # moving bytes to the front would overwrite a piece: start afresh
            fresh = _Buffer(self._size)
            fresh.data[:unparsed] = buffer.view[self._start : self._end]
            self._buffer = buffer = fresh
        elif unparsed:
            buffer.data[:unparsed] = buffer.view[self._start : self._end]
        self._start, self._end = 0, unparsed
        return buffer.view[unparsed:]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """Account for `nbytes` received into the last get_buffer(); return the events."""
        self._end += nbytes
        events: list[Event] = []
        self._parse(events)
        if self._start == self._end and not self._buffer.leased:
            self._start = self._end = 0  # nothing kept: the next receive gets the whole buffer
        return events

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes by copying them through get_buffer (tests and slow paths)."""
        events: list[Event] = []
        source = memoryview(data).cast("B")
        while source:
            target = self.get_buffer()
            count = min(len(target), len(source))
            target[:count] = source[:count]
            source = source[count:]
            events += self.buffer_updated(count)
        return events

    def _parse(self, events: list[Event]) -> None:
        view = self._buffer.view
        while True:
            if self._pending is not None and not self._take_payload(events):
                return
            start = self._start
            if self._end - start < _HEADER_SIZE:
                return
            magic, flags, command, cookie, offset, length = _HEADER.unpack_from(view, start)
            self._start = start + _HEADER_SIZE
            if magic != REQUEST_MAGIC:
                raise ProtocolViolation(f"bad request magic {magic:#x}")
            request = Request(flags, command, cookie, offset, length)
            events.append(request)
            if command == _WRITE:
                self._pending = request
                self._filled = 0

    def _take_payload(self, events: list[Event]) -> bool:
        """Hand out what has arrived of the pending payload; True once it is complete."""
        request = self._pending
        assert request is not None
        start = self._start
        count = min(request.length - self._filled, self._end - start)
        if not count and request.length:
            return False
        buffer = self._buffer
        at = self._filled
        self._filled = at + count
        self._start = start + count
        final = self._filled == request.length
        if count:
            buffer.leased += count
            events.append(Data(request, at, buffer.view[start : start + count], final, buffer))
        else:
            events.append(Data(request, at, _EMPTY, final, None))
        if final:
            self._pending = None
        return final
