"""Serve validated requests against an export's device and encode the replies.

Fast operations (pread, pwrite, fallocate, lseek) run inline on the event loop
and reply at once; flushes (FLUSH, FUA) run in a worker thread, so their replies
may overtake or trail others: NBD replies are matched by cookie.

A WRITE's payload comes in pieces, and is written in parts as it arrives where the
device accepts that (writes.py): the client refills the socket while we write instead
of both waiting in turn.

No request holds the loop for long, whatever it asks: TRIM, WRITE_ZEROES and CACHE run
in slices, and when a turn's budget is spent the rest continues in a task that yields
between turns; BLOCK_STATUS stops at a count of extents or a time budget, whichever
comes first (the protocol lets a reply describe less than was asked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

from nbdguard.errors import nbd_error_for
from nbdguard.observability.metrics import command_label
from nbdguard.protocol import wire
from nbdguard.protocol.constants import (
    BASE_ALLOCATION_ID,
    AllocationFlag,
    Command,
    CommandFlag,
    NBDError,
)
from nbdguard.protocol.transmission import Data, Event, Request
from nbdguard.protocol.validate import SessionLimits, validate
from nbdguard.server.exports import Export
from nbdguard.server.output import Deferred
from nbdguard.server.writes import IncomingWrite
from nbdguard.storage.device import Buffer, Extent, FileRange, WouldBlock

ZERO = int(AllocationFlag.ZERO)  # OFFSET_HOLE means "reads as zeroes"
# Per-request tests use plain ints: `int & IntFlag` builds a new enum object every time.
_FUA = int(CommandFlag.FUA)
_DF = int(CommandFlag.DF)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_OK = NBDError.OK

SPARSE_READ_MIN = 64 * 1024  # smaller reads are sent as data: a hole probe costs more
RANGE_READ_MIN = 64 * 1024  # from here up, data the device holds in a file goes by sendfile
DEFERRED_PIECE = 1 << 20  # a deferred structured read is made this much at a time
READ_MAX_EXTENTS = 64
STATUS_MAX_EXTENTS = 4096
STATUS_STEP = 256  # extents asked of the device per call, so the time budget is checked
STATUS_BUDGET = 0.002  # seconds of loop time one BLOCK_STATUS context may take
OFF_LOOP_WRITE = 1 << 20  # a write this long, gathered whole, is written off the loop
SLICE_MIN = 2 << 20  # slices end on multiples of this: whole qcow2 clusters (≤ 2 MiB)
SLICE_MAX = 1 << 30
TURN_BUDGET = 0.004  # seconds of loop time a sliced request takes before it yields
ReplyPiece = Buffer | FileRange | Deferred
Send = Callable[[Sequence[ReplyPiece]], None]

_WRITE = int(Command.WRITE)


class Dispatcher:
    """Per-connection request handling; one export, one negotiated session."""

    def __init__(
        self,
        export: Export,
        limits: SessionLimits,
        contexts: tuple[int, ...],
        send: Send,
        log: Any,
        *,
        debug: bool = False,
        max_in_flight: int = 256,
        on_busy: Callable[[bool], None] = lambda busy: None,
        on_released: Callable[[], None] = lambda: None,
    ) -> None:
        self.export = export
        self.device = export.device
        self.limits = limits
        self.structured = limits.structured_replies
        self.contexts = contexts
        self.send = send
        self.log = log
        self.debug = debug  # one log event per request: only when asked for
        self.metrics = export.metrics
        self._started = export.metrics.request_started  # bound once: this is per request
        self._record = export.metrics.request_finished
        self.tasks: set[asyncio.Task[None]] = set()  # replies still being worked on
        self.max_in_flight = max_in_flight
        self.on_busy = on_busy
        self.on_released = on_released  # held bytes were let go outside a receive
        self._writing = 0  # bytes of gathered writes being written off the loop
        self.shutting_down = False
        self._incoming: IncomingWrite | None = None  # a WRITE whose payload is arriving
        # the last WRITE header and its verdict, until its payload starts: (request, start
        # time, validation error); a payload that comes whole in one piece needs no more
        self._header: tuple[Request, float, NBDError] = (Request(0, _WRITE, 0, 0, 0), 0.0, _OK)
        # Sliced work runs one request at a time per connection: a client that pipelines many
        # costly ranges gets one turn per loop iteration, not one per request.
        self._slicing = asyncio.Lock()

    def receive(self, event: Event) -> None:
        """The one entry point: a request's header, or a piece of a WRITE's payload. Each
        request is validated once, at its header."""
        if event.__class__ is Data:
            self._payload(event)
        else:
            self._request(event)  # type: ignore[arg-type]

    @property
    def held(self) -> int:
        """Payload bytes this connection has copied and not yet written."""
        incoming = self._incoming
        return self._writing + (incoming.held if incoming is not None else 0)

    @property
    def gathering(self) -> bool:
        """A WRITE that must be seen whole is arriving (its bytes are being gathered)."""
        incoming = self._incoming
        return incoming is not None and not incoming.unit and not incoming.error

    def _request(self, request: Request) -> None:
        error = NBDError.ESHUTDOWN if self.shutting_down else validate(request, self.limits)
        if request.command == _WRITE:
            # In flight once its last piece is here: a client that leaves mid-payload never
            # gets that far. Latency counts from the header.
            self._header = (request, perf_counter(), error)
            return
        started = self._started()
        if error:
            self.reply_error(request, error)
            self.finished(request, error, started)
            return
        try:
            pending = _HANDLERS[request.command](self, request, started)
        except Exception as exc:  # WouldBlock included: only writes may wait
            self.finished(request, self.fail(request, exc), started)
            return
        if not pending:
            self.finished(request, _OK, started)

    def _payload(self, piece: Data) -> None:
        incoming = self._incoming
        if incoming is None:
            if piece.final:  # the whole payload in one piece: most writes
                self._whole_write(piece)
                return
            request, started, error = self._header
            unit = 0 if error else self.device.partial_write_unit(request.offset)
            incoming = self._incoming = IncomingWrite(request, started, error, unit)
        assert incoming.request is piece.request
        if not piece.final:
            incoming.add(self.device, piece.data)
            piece.release()
            return
        self._incoming = None
        self._started()
        request, started = incoming.request, incoming.started
        if incoming.error:
            self._refuse_write(request, started, incoming.error, piece)
            return
        try:
            rest = incoming.rest(piece.data)  # raises the failure of an earlier part
        except Exception as exc:
            piece.release()
            self.finished(request, self.fail(request, exc), started)
            return
        if not incoming.unit and len(rest) >= OFF_LOOP_WRITE:  # gathered: one long pwrite
            self._writing += len(rest)
            self.spawn(self._write_off_loop(request, started, rest, piece))
            return
        self._write_rest(request, started, piece, rest, request.offset + incoming.written)

    def _whole_write(self, piece: Data) -> None:
        """A WRITE whose payload came in one piece (at most a receive buffer: written on the
        loop), straight from the receive buffer."""
        request, started, error = self._header
        assert request is piece.request
        self._started()
        if error:
            self._refuse_write(request, started, error, piece)
            return
        self._write_rest(request, started, piece, piece.data, request.offset)

    def _refuse_write(self, request: Request, started: float, error: NBDError, piece: Data) -> None:
        piece.release()
        self.reply_error(request, error)
        self.finished(request, error, started)

    def _write_rest(
        self, request: Request, started: float, piece: Data, data: Buffer, offset: int
    ) -> None:
        """Write a WRITE's last bytes at `offset` and reply; the last piece stays leased
        until they are written (a retry off the loop included)."""
        try:
            if data:
                self.device.pwrite(data, offset)
            pending = self._finish_write(request, started)
        except WouldBlock as blocked:
            self.spawn(self._retry_then_reply(request, started, blocked.retry, piece))
            return
        except Exception as exc:
            piece.release()
            self.finished(request, self.fail(request, exc), started)
            return
        piece.release()
        if not pending:
            self.finished(request, _OK, started)

    async def _write_off_loop(
        self, request: Request, started: float, data: Buffer, piece: Data
    ) -> None:
        """Write a gathered payload in a worker thread (waiting there for the sector-0 lock
        if another holds it), so that the loop serves everyone else meanwhile."""
        device, offset = self.device, request.offset

        def write() -> None:
            try:
                device.pwrite(data, offset)
            except WouldBlock as blocked:
                blocked.retry()

        try:
            await asyncio.to_thread(write)
            pending = self._finish_write(request, started)
        except Exception as exc:
            self.finished(request, self.fail(request, exc), started)
            return
        finally:
            piece.release()
            self._writing -= len(data)
            self.on_released()
        if not pending:
            self.finished(request, _OK, started)

    async def _retry_then_reply(
        self, request: Request, started: float, retry: Callable[[], None], piece: Data
    ) -> None:
        """A write that would have waited (a lock another process holds) runs in a worker
        thread; the loop serves everyone else meanwhile."""
        try:
            await asyncio.to_thread(retry)
            pending = self._finish_write(request, started)
        except Exception as exc:
            self.finished(request, self.fail(request, exc), started)
            return
        finally:
            piece.release()
        if not pending:
            self.finished(request, _OK, started)

    def finished(self, request: Request, error: int, started: float) -> None:
        self._record(request.command, request.length, error, started)
        if self.debug:
            self.log.debug(
                "request.done",
                command=command_label(request.command),
                offset=request.offset,
                length=request.length,
                error=error,
            )

    def fail(self, request: Request, exc: BaseException) -> NBDError:
        """Answer a request whose handler raised; returns the error sent."""
        error = self._failed(request, exc)
        self.reply_error(request, error)
        return error

    def _failed(self, request: Request, exc: BaseException) -> NBDError:
        """Report a request's failure; returns the error its reply must carry. A layer
        that reported the failure itself (the guard's refusals) marks it `reported`."""
        error = nbd_error_for(exc)
        if getattr(exc, "reported", False):
            return error
        self.log.warning(
            "request.failed",
            command=command_label(request.command),
            offset=request.offset,
            length=request.length,
            error=error.name,
            cause=repr(exc),
        )
        return error

    def reply_error(self, request: Request, error: NBDError) -> None:
        if self.structured and request.command in (Command.READ, Command.BLOCK_STATUS):
            self.send([wire.error_chunk(request.cookie, error, error.name)])
        else:
            self.send([wire.simple_reply(request.cookie, error)])

    def reply_ok(self, request: Request) -> None:
        self.send([wire.simple_reply(request.cookie, 0)])

    # -- commands ---------------------------------------------------------------

    def read(self, request: Request, started: float) -> bool:
        cookie, offset, length = request.cookie, request.offset, request.length
        if not self.structured:
            return self._simple_read(request, started)
        if length >= SPARSE_READ_MIN and self.device.capabilities.sparse_reads:
            self._read_sparse(request)
        elif length:
            self.send(self._data_chunk(request, offset, length, done=True))
        else:
            self.send([wire.none_chunk(cookie)])
        return False

    def _simple_read(self, request: Request, started: float) -> bool:
        """A file range, or for a large read without one, the whole reply deferred until the
        output can take it (an error found then still goes in the reply's header)."""
        cookie, offset, length = request.cookie, request.offset, request.length
        if length >= RANGE_READ_MIN:
            piece = self.device.read_range(offset, length)
            if piece is not None:
                self.send([wire.simple_reply(cookie, 0), piece])
                return False
            self.send([Deferred(lambda: self._produce_simple(request, started))])
            return True
        self.send([wire.simple_reply(cookie, 0), self.device.pread(offset, length)])
        return False

    def _produce_simple(self, request: Request, started: float) -> list[ReplyPiece]:
        try:
            data = self.device.pread(request.offset, request.length)
        except Exception as exc:
            error = self._failed(request, exc)
            self.finished(request, error, started)
            return [wire.simple_reply(request.cookie, error)]
        self.finished(request, _OK, started)
        return [wire.simple_reply(request.cookie, 0), data]

    def _data_chunk(
        self, request: Request, offset: int, length: int, *, done: bool
    ) -> list[ReplyPiece]:
        """One structured data chunk; where its bytes must be read into memory, deferred
        until the output can take it and made in pieces of at most DEFERRED_PIECE."""
        cookie = request.cookie
        if length >= RANGE_READ_MIN:
            piece = self.device.read_range(offset, length)
            if piece is not None:
                return [wire.data_chunk_header(cookie, offset, length, done=done), piece]
            return [Deferred(lambda: self._produce_chunk(request, offset, length, done))]
        data = self.device.pread(offset, length)
        return [wire.data_chunk_header(cookie, offset, length, done=done), data]

    def _produce_chunk(
        self, request: Request, offset: int, length: int, done: bool
    ) -> list[ReplyPiece]:
        """The next piece of a deferred data chunk, and a Deferred for the rest; a failure
        is an error chunk for the rest (the reply's other chunks still follow)."""
        cookie, part = request.cookie, min(length, DEFERRED_PIECE)
        try:
            data = self.device.pread(offset, part)
        except Exception as exc:
            error = self._failed(request, exc)
            return [wire.error_chunk(cookie, error, error.name, offset=offset, done=done)]
        last = part == length
        pieces: list[ReplyPiece] = [
            wire.data_chunk_header(cookie, offset, part, done=done and last),
            data,
        ]
        if not last:
            rest = offset + part, length - part
            pieces.append(Deferred(lambda: self._produce_chunk(request, *rest, done)))
        return pieces

    def _read_sparse(self, request: Request) -> None:
        """Structured read that sends holes as OFFSET_HOLE chunks (one chunk when DF)."""
        cookie, offset, length = request.cookie, request.offset, request.length
        extents = self.device.block_status(offset, length, READ_MAX_EXTENTS)
        if request.flags & _DF:
            if extents[0][0] >= length and extents[0][1] & ZERO:
                self.send([wire.hole_chunk(cookie, offset, length, done=True)])
            else:
                self.send(self._data_chunk(request, offset, length, done=True))
            return
        self.send(self._sparse_chunks(request, extents))

    def _sparse_chunks(self, request: Request, extents: list[Extent]) -> list[ReplyPiece]:
        cookie, offset, length = request.cookie, request.offset, request.length
        end = offset + length
        pieces: list[ReplyPiece] = []
        pos = offset
        for extent_length, flags in extents:
            stop = min(pos + extent_length, end)
            last = stop >= end
            if flags & ZERO:
                pieces.append(wire.hole_chunk(cookie, pos, stop - pos, done=last))
            else:
                pieces += self._data_chunk(request, pos, stop - pos, done=last)
            pos = stop
            if last:
                return pieces
        pieces += self._data_chunk(request, pos, end - pos, done=True)
        return pieces

    def trim(self, request: Request, started: float) -> bool:
        return self._sliced(request, started, self.device.trim, self._finish_write)

    def write_zeroes(self, request: Request, started: float) -> bool:
        device, flags = self.device, request.flags
        may_trim, fast = not flags & _NO_HOLE, bool(flags & _FAST_ZERO)

        def zero(offset: int, length: int) -> None:
            device.write_zeroes(offset, length, may_trim=may_trim, fast=fast)

        return self._sliced(request, started, zero, self._finish_write)

    def _sliced(
        self,
        request: Request,
        started: float,
        operation: Callable[[int, int], None],
        finish: Callable[[Request, float], bool],
    ) -> bool:
        """Run a range operation for one turn's budget; if that does not finish it, the rest
        runs in a task that yields to the loop between turns (after this connection's other
        sliced work, if any is still running). `finish` sends the reply."""
        work = Slices(operation, request.offset, request.length)
        blocked = None
        if not self._slicing.locked():
            blocked = work.run(TURN_BUDGET)
            if work.done and blocked is None:
                return finish(request, started)
        self.spawn(self._continue_sliced(request, started, work, blocked, finish))
        return True

    async def _continue_sliced(
        self,
        request: Request,
        started: float,
        work: Slices,
        blocked: Callable[[], None] | None,
        finish: Callable[[Request, float], bool],
    ) -> None:
        try:
            async with self._slicing:
                while True:
                    if blocked is not None:  # a slice that must wait (a lock) waits off the loop
                        await asyncio.to_thread(blocked)
                    if work.done:
                        break
                    await asyncio.sleep(0)
                    blocked = work.run(TURN_BUDGET)
            pending = finish(request, started)
        except Exception as exc:
            self.finished(request, self.fail(request, exc), started)
            return
        if not pending:
            self.finished(request, _OK, started)

    def _finish_write(self, request: Request, started: float) -> bool:
        if request.flags & _FUA:
            return self.flush(request, started)
        self.reply_ok(request)
        return False

    def flush(self, request: Request, started: float) -> bool:
        self.spawn(self._flush_then_reply(request, started))
        return True

    async def _flush_then_reply(self, request: Request, started: float) -> None:
        try:
            await asyncio.to_thread(self.device.flush)
        except Exception as exc:
            self.finished(request, self.fail(request, exc), started)
            return
        self.reply_ok(request)
        self.finished(request, NBDError.OK, started)

    def cache(self, request: Request, started: float) -> bool:
        return self._sliced(request, started, self.device.cache, self._reply_cached)

    def _reply_cached(self, request: Request, started: float) -> bool:
        self.reply_ok(request)
        return False

    def block_status(self, request: Request, started: float) -> bool:
        limit = 1 if request.flags & _REQ_ONE else STATUS_MAX_EXTENTS
        last = len(self.contexts) - 1
        chunks = []
        for index, context in enumerate(self.contexts):
            status = (
                self.device.block_status
                if context == BASE_ALLOCATION_ID
                else self.device.allocation_depth
            )
            extents = bounded_extents(status, request.offset, request.length, limit)
            chunks.append(
                wire.block_status_chunk(request.cookie, context, extents, done=index == last)
            )
        self.send(chunks)
        return False

    def spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) == self.max_in_flight:
            self.on_busy(True)  # stop reading: a client must not pile up unbounded work

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if len(self.tasks) == self.max_in_flight - 1:
            self.on_busy(False)

    async def drain(self) -> None:
        """Wait until every reply still being worked on has been sent."""
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


StatusCall = Callable[[int, int, int], list[Extent]]  # (offset, length, max_extents)


def bounded_extents(status: StatusCall, offset: int, length: int, limit: int) -> list[Extent]:
    """Extents from the start of the range, at most `limit`, asked STATUS_STEP at a time
    until the range is covered or STATUS_BUDGET is spent (a file of many small extents
    must not hold the loop); adjacent extents of the same flags are merged."""
    deadline = perf_counter() + STATUS_BUDGET
    extents: list[Extent] = []
    while True:
        asked = offset
        for reported, flags in status(offset, length, min(limit - len(extents), STATUS_STEP)):
            covered = min(reported, length)
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + covered, flags)
            else:
                extents.append((covered, flags))
            offset += covered
            length -= covered
            if not length:
                return extents
        if len(extents) >= limit or offset == asked or perf_counter() >= deadline:
            return extents


class Slices:
    """A range operation done a slice at a time. Slices end on multiples of SLICE_MIN and
    grow while they are quick, so a cheap operation (a raw TRIM) takes few calls and a
    costly one (zeroing a qcow2 of small clusters) still yields often."""

    __slots__ = ("end", "operation", "position", "size")

    def __init__(self, operation: Callable[[int, int], None], offset: int, length: int) -> None:
        self.operation = operation
        self.position = offset
        self.end = offset + length
        self.size = SLICE_MIN

    @property
    def done(self) -> bool:
        return self.position >= self.end

    def run(self, budget: float) -> Callable[[], None] | None:
        """Do slices for about `budget` seconds. A slice that would block is counted as done
        and its retry returned: the caller must run it (off the loop) before going on."""
        deadline = perf_counter() + budget
        while not self.done:
            start = self.position
            stop = min(self.end, start // SLICE_MIN * SLICE_MIN + self.size)
            before = perf_counter()
            try:
                self.operation(start, stop - start)
            except WouldBlock as blocked:
                self.position = stop
                return blocked.retry
            self.position = stop
            now = perf_counter()
            if now - before < budget / 8 and self.size < SLICE_MAX:
                self.size *= 2
            elif now - before > budget / 2 and self.size > SLICE_MIN:
                self.size //= 2
            if now >= deadline:
                break
        return None


_HANDLERS: dict[int, Callable[[Dispatcher, Request, float], bool]] = {
    Command.READ: Dispatcher.read,
    Command.FLUSH: Dispatcher.flush,
    Command.TRIM: Dispatcher.trim,
    Command.CACHE: Dispatcher.cache,
    Command.WRITE_ZEROES: Dispatcher.write_zeroes,
    Command.BLOCK_STATUS: Dispatcher.block_status,
}
