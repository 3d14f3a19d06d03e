"""What a connection sends during transmission, in order.

Replies are buffers and `FileRange`s (image bytes still in the page cache). Buffers go
through the transport, gathered into one writev per batch of requests. A file range is
sent with sendfile(2) straight from the page cache to the socket, so read data is
neither copied into nor mapped by the process; that is only correct while the
transport holds nothing unsent, so the transport is set to report (pause_writing) as
soon as it buffers a byte, and replies wait in our queue until it has drained
(resume_writing). Under TLS, which needs the bytes, ranges are read with pread.
A range's `recheck` runs right before its file is read, in the same call as the read.

A reply whose bytes must be read into memory (qcow2, data below the sendfile threshold
is not among them) can be queued `Deferred`: it is produced only when the output reaches
it and the transport can take more, so replies a client does not read hold no data.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import cast

from nbdguard.storage.device import Buffer, FileRange
from nbdguard.storage.fileops import read_exactly

FLUSH_BUDGET = 0.004  # seconds of loop time one flush may spend making reply bytes
RANGE_PART = 1 << 20  # a range read for TLS is read this much at a time


class Deferred:
    """Pieces made only when the output can take them; `produce` must not raise (a failure
    becomes an error reply) and may return further Deferreds, to make a reply in parts."""

    __slots__ = ("produce",)

    def __init__(self, produce: Callable[[], list[Piece]]) -> None:
        self.produce = produce


Piece = Buffer | FileRange | Deferred
_SPECIAL = (FileRange, Deferred)


class ReplyWriter:
    """Owns the transport's output once transmission starts."""

    def __init__(self, transport: asyncio.Transport, on_failure: Callable[[OSError], None]) -> None:
        self._transport = transport
        self._on_failure = on_failure  # a range could not be sent: the stream is broken
        self._queue: deque[Piece] = deque()
        self._ranges = 0  # FileRanges and Deferreds in the queue
        self._queued = 0  # bytes of the buffers in the queue
        self._corked = False
        self.blocked = False  # the transport holds unsent bytes
        self._later: asyncio.Handle | None = None  # a flush continued on the next loop turn
        self._socket = _socket_for_sendfile(transport)
        if self._socket is not None:
            transport.set_write_buffer_limits(high=0, low=0)

    def send(self, pieces: Sequence[Piece]) -> None:
        for piece in pieces:
            if type(piece) in _SPECIAL:
                self._ranges += 1
            else:
                self._queued += len(piece)  # type: ignore[arg-type]
            self._queue.append(piece)
        if not self._corked:
            self._flush()

    def buffered(self) -> int:
        """Reply bytes held in memory: queued here and unsent in the transport."""
        return self._queued + self._transport.get_write_buffer_size()

    def cork(self) -> None:
        """Hold replies until uncork(): those of one receive leave in one writev."""
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        self._flush()

    def pause(self) -> None:
        self.blocked = True

    def resume(self) -> None:
        """The transport has sent everything it held: what waited may go now."""
        self.blocked = False
        self._flush()

    def close(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._queue.clear()
        self._queued = self._ranges = 0
        if self._socket is not None:
            self._socket.close()  # our duplicate of the descriptor, not the connection

    def _flush(self) -> None:
        """Send what the transport can take. Making bytes (a deferred reply, a range read
        for TLS) stops after FLUSH_BUDGET of loop time and goes on at the next loop turn: a
        client that reads as fast as replies are made must not hold the loop."""
        queue = self._queue
        transport = self._transport
        deadline = perf_counter() + FLUSH_BUDGET
        while queue and not self.blocked and not transport.is_closing():
            if self._ranges and perf_counter() >= deadline:
                self._continue_later()
                return
            if not self._ranges:
                pieces = cast(list[Buffer], list(queue))  # no ranges among them
                queue.clear()
                self._queued = 0
                transport.writelines(pieces)
                return
            head: list[Buffer] = []
            while type(queue[0]) not in _SPECIAL:
                head.append(queue.popleft())  # type: ignore[arg-type]
            self._queued -= sum(map(len, head))
            piece = queue.popleft()
            self._ranges -= 1
            try:
                if type(piece) is Deferred:
                    if head:
                        transport.writelines(head)
                    self._push_front(piece.produce())
                elif self._socket is None:  # TLS: the transport needs the bytes
                    assert isinstance(piece, FileRange)
                    head.append(self._read_part(piece))
                    transport.writelines(head)
                else:
                    assert isinstance(piece, FileRange)
                    self._send_direct(head, piece)
            except OSError as err:
                queue.clear()
                self._ranges = self._queued = 0
                self._on_failure(err)
                return

    def _continue_later(self) -> None:
        if self._later is None:
            self._later = asyncio.get_running_loop().call_soon(self._continue)

    def _continue(self) -> None:
        self._later = None
        if not self._corked:
            self._flush()

    def _read_part(self, piece: FileRange) -> Buffer:
        """At most RANGE_PART bytes of a range, read now; the rest goes back to the front of
        the queue (TLS sends what it is given whole: a 32 MiB range would be 32 MiB of
        plaintext and as much ciphertext held at once)."""
        fresh = _changed(piece)
        if fresh is not None:
            return fresh  # the device's bytes as they are now, already in memory
        if piece.length <= RANGE_PART:
            return read_exactly(piece.fd, piece.offset, piece.length)
        data = read_exactly(piece.fd, piece.offset, RANGE_PART)
        rest = FileRange(
            piece.fd,
            piece.offset + RANGE_PART,
            piece.length - RANGE_PART,
            _tail(piece.recheck, RANGE_PART) if piece.recheck is not None else None,
        )
        self._push_front([rest])
        return data

    def _push_front(self, pieces: list[Piece]) -> None:
        for piece in reversed(pieces):
            if type(piece) in _SPECIAL:
                self._ranges += 1
            else:
                self._queued += len(piece)  # type: ignore[arg-type]
            self._queue.appendleft(piece)

    def _send_direct(self, head: list[Buffer], piece: FileRange) -> None:
        """Buffers then a range, straight to the socket; what does not fit right now is
        handed to the transport (which then reports itself blocked)."""
        assert self._socket is not None
        fresh = _changed(piece)
        if fresh is not None:
            head.append(fresh)
            self._transport.writelines(head)
            return
        sent = 0
        if head:
            with contextlib.suppress(BlockingIOError):
                sent = self._socket.sendmsg(head, (), socket.MSG_MORE)
            unsent = _skip(head, sent)
            if unsent:
                unsent.append(read_exactly(piece.fd, piece.offset, piece.length))
                self._transport.writelines(unsent)
                return
        out = self._socket.fileno()
        done = 0
        while done < piece.length:
            try:
                count = os.sendfile(out, piece.fd, piece.offset + done, piece.length - done)
            except BlockingIOError:
                break
            if count == 0:
                raise OSError(errno.EIO, "image file ends inside a read reply")
            done += count
        if done < piece.length:
            rest = read_exactly(piece.fd, piece.offset + done, piece.length - done)
            self._transport.write(rest)


def _changed(piece: FileRange) -> Buffer | None:
    """The device's bytes if the file no longer holds them (see FileRange.recheck), else None."""
    return piece.recheck() if piece.recheck is not None else None


def _tail(recheck: Callable[[], Buffer | None], skip: int) -> Callable[[], Buffer | None]:
    """The recheck of a range's rest, `skip` bytes in: the whole range's, cut."""

    def rest() -> Buffer | None:
        fresh = recheck()
        return memoryview(fresh)[skip:] if fresh is not None else None

    return rest


def _skip(buffers: list[Buffer], count: int) -> list[Buffer]:
    """What is left of `buffers` after the first `count` bytes were sent."""
    for index, buffer in enumerate(buffers):
        size = len(buffer)
        if count < size:
            rest = buffers[index:]
            rest[0] = memoryview(buffer)[count:]
            return rest
        count -= size
    return []


def _socket_for_sendfile(transport: asyncio.Transport) -> socket.socket | None:
    """A socket object on a duplicate of the connection's descriptor (sendmsg with flags
    needs one; uvloop only exposes a stand-in), or None when bytes must pass through the
    transport (TLS)."""
    if transport.get_extra_info("sslcontext") or transport.get_extra_info("ssl_object"):
        return None
    stand_in = transport.get_extra_info("socket")
    if stand_in is None:
        return None
    try:
        sock = socket.socket(fileno=os.dup(stand_in.fileno()))
    except OSError:
        return None
    sock.setblocking(False)
    return sock
