"""asyncio glue for one client connection: receive into the protocol's buffers,
hand events to the dispatcher, and write replies with transport-level backpressure.

A connection goes through explicit phases (`Phase`): the handshake (a TLS upgrade
included), transmission, closing (NBD_CMD_DISC or shutdown: nothing more is read while
replies drain) and closed. It reads its settings from a `ConnectionSettings`, made once from
the config, and reports what it holds to the server's `MemoryBudget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from nbdguard.config import ServerConfig, TlsMode
from nbdguard.observability.reporter import connection_context
from nbdguard.protocol.constants import Command
from nbdguard.protocol.handshake import Handshake, HandshakeClosed, HandshakeDone, StartTls
from nbdguard.protocol.transmission import Data, Event, ProtocolViolation, RequestParser
from nbdguard.protocol.validate import SessionLimits
from nbdguard.server.access import ClientIdentity, ClientView
from nbdguard.server.admission import certificate_key, client_key
from nbdguard.server.dispatch import Dispatcher
from nbdguard.server.output import Piece, ReplyWriter

if TYPE_CHECKING:
    from nbdguard.server.app import Server
    from nbdguard.server.exports import Export

_ids = itertools.count(1)
_DISC = int(Command.DISC)
HANDSHAKE_BUFFER = 64 * 1024
TURN_BUDGET = 0.005  # seconds one connection serves requests before the others get a turn


class Phase(enum.Enum):
    HANDSHAKE = "handshake"  # greeting sent, options being negotiated (STARTTLS included)
    TRANSMISSION = "transmission"
    CLOSING = "closing"  # DISC or shutdown: nothing more is read, replies drain
    CLOSED = "closed"


_TRANSMISSION = Phase.TRANSMISSION  # per receive: a module global, not an enum lookup


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """What a connection needs of the config, read once."""

    handshake_timeout: float
    idle_timeout: float
    send_buffer: int
    max_requests_in_flight: int
    tls_mode: TlsMode
    debug: bool

    @classmethod
    def from_config(cls, config: ServerConfig) -> ConnectionSettings:
        return cls(
            handshake_timeout=config.handshake_timeout,
            idle_timeout=config.idle_timeout,
            send_buffer=config.send_buffer,
            max_requests_in_flight=config.max_requests_in_flight,
            tls_mode=config.tls.mode,
            debug=config.log_level == "debug",
        )


class Connection(asyncio.BufferedProtocol):
    """One NBD client, from greeting to disconnect."""

    def __init__(self, server: Server, listener: str, settings: ConnectionSettings) -> None:
        self.server = server
        self.settings = settings
        self.id = next(_ids)
        self.phase = Phase.HANDSHAKE
        self.log = server.log.bind(conn=self.id, listener=listener)
        self.transport: asyncio.Transport | None = None
        self.client = ClientIdentity(None)
        self.handshake: Handshake | None = None  # made once the peer is known
        self.parser: RequestParser | None = None
        self.dispatcher: Dispatcher | None = None
        self.export_name: str | None = None
        self.export: Export | None = None
        self._handshake_view = memoryview(bytearray(HANDSHAKE_BUFFER))
        self._deadline: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._busy = False  # too many replies being worked on: stop reading requests
        self._yielded = False  # turn budget spent with requests left: others go first
        self._over_budget = False  # holds too many bytes: read more once they drain
        self._budget = server.budget
        self._account = self._budget.open(self._budget_freed)
        self._backlog: deque[Event] = deque()
        self._closer: asyncio.Future[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._writer: ReplyWriter | None = None  # made when transmission starts
        self._loop = asyncio.get_running_loop()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_request = 0.0
        self._context: MappingProxyType[str, Any] = MappingProxyType({"conn": self.id})
        self._lost = False
        self._reported = 0  # bytes held as last counted in the export's gauge

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport = self.transport
        peer = transport.get_extra_info("peername")
        described = _format_peer(peer)
        self.log = self.log.bind(client=described)
        self._context = MappingProxyType({"conn": self.id, "client": described})
        self.client = ClientIdentity.from_peer(peer)
        key = client_key(self.client, transport.get_extra_info("socket"))
        refused = self.server.admission.admit(self, key, self._loop.time())
        if refused is not None:
            self.phase = Phase.CLOSED
            self._refuse(refused, key)
            return
        self.server.connections.add(self)
        _size_send_buffer(transport, self.settings.send_buffer)
        self.handshake = Handshake(
            ClientView(self.server.registry, self.client, self._limit_hit),
            self.server.handshake_limits,
            tls_mode=self.settings.tls_mode,
        )
        transport.write(self.handshake.data_to_send())
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.settings.handshake_timeout, self._handshake_expired)
        self.log.debug("connection.opened")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.parser is not None:
            return self.parser.get_buffer()
        return self._handshake_view

    def buffer_updated(self, nbytes: int) -> None:
        phase = self.phase
        if phase is _TRANSMISSION:
            self._receive_requests(nbytes)
        elif phase is Phase.HANDSHAKE and self.handshake is not None:
            self._receive_handshake(self._handshake_view[:nbytes])
        # closing: what a client sends after DISC (or during shutdown) is not read

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:  # a failed TLS upgrade may report the loss twice
            return
        self._lost = True
        self.phase = Phase.CLOSED
        if self._deadline is not None:
            self._deadline.cancel()
        self.server.connections.discard(self)
        self.server.admission.release(self)
        self._release_backlog()
        if self.handshake is not None:
            self._handshake_failed("disconnected", "client closed during the handshake", clean=True)
        if self.dispatcher is not None:
            self.dispatcher.shutting_down = True
            self.dispatcher.metrics.connection_closed()
        throttled = self._budget.close(self._account)
        if self.export is not None:
            self.export.metrics.buffered(-self._reported)
            self.export.metrics.throttled(throttled)
            self.export.detach()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._writer is not None:
            self._writer.close()
        self.log.info(
            "connection.closed", export=self.export_name, error=repr(exc) if exc else None
        )
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._writer is not None:
            self._writer.pause()
        self._set_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        writer = self._writer
        if writer is not None:
            writer.resume()  # may fill the transport (and pause us) again
            self._check_budget()
        self._set_reading()

    # -- byte budget -------------------------------------------------------------

    def _held(self) -> int:
        writer, dispatcher = self._writer, self.dispatcher
        held = writer.buffered() if writer is not None else 0
        return held + (dispatcher.held if dispatcher is not None else 0)

    def _check_budget(self) -> None:
        """Report what this connection holds; stop reading past the budget, and serve the
        backlog again once it has drained."""
        held = self._held()
        if not held and not self._reported and not self._over_budget:
            return  # the common case: nothing held before or now
        self._budget.update(self._account, held)
        if self.export is not None and held != self._reported:
            self.export.metrics.buffered(held - self._reported)
            self._reported = held
        gathering = self.dispatcher is not None and self.dispatcher.gathering
        over = self._budget.over(self._account, gathering=gathering)
        if over and not self._over_budget:
            self._over_budget = True
            self.server.metrics.limit_hit("max_buffered_bytes_per_connection")
            self._set_reading()
        elif not over and self._over_budget:
            self._over_budget = False
            if self.export is not None:
                self.export.metrics.throttled(self._budget.unthrottled(self._account))
            self._loop.call_soon(self._next_turn)

    def _released(self) -> None:
        """The dispatcher let go of bytes outside a receive (a write done off the loop)."""
        if self.phase is not Phase.CLOSED:
            self._check_budget()

    def _budget_freed(self) -> None:
        """The server's budget has room again (another connection drained)."""
        if self._over_budget:
            self._loop.call_soon(self._check_budget)

    # -- handshake -------------------------------------------------------------------

    def _receive_handshake(self, data: memoryview) -> None:
        assert self.handshake is not None and self.transport is not None
        event = self.handshake.receive(data)
        pending = self.handshake.data_to_send()
        if pending:
            self.transport.write(pending)
        if isinstance(event, HandshakeClosed):
            self._handshake_failed(event.code, event.reason, clean=event.clean)
            self.phase = Phase.CLOSING
            self.transport.close()
        elif isinstance(event, HandshakeDone):
            self._enter_transmission(event)
        elif isinstance(event, StartTls):
            asyncio.get_running_loop().create_task(self._upgrade_to_tls())

    async def _upgrade_to_tls(self) -> None:
        """STARTTLS was acknowledged: wrap the transport, then resume the handshake."""
        assert self.transport is not None and self.server.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                self.server.tls_context,
                server_side=True,
                ssl_handshake_timeout=self.settings.handshake_timeout,
            )
        except (OSError, ssl.SSLError) as err:  # TimeoutError is an OSError
            if self.handshake is not None:
                self._handshake_failed("tls", f"TLS handshake failed: {err}", clean=False)
            self.transport.abort()
            self.connection_lost(err)
            return
        if self.handshake is None or transport is None:
            return  # timed out or closed meanwhile
        self.transport = transport
        refusal = self.client.set_certificate(transport.get_extra_info("peercert"))
        self.log = self.log.bind(tls=True, client_cert=self.client.describe() or None)
        if refusal is not None:  # counted and logged like a failed TLS handshake
            self._handshake_failed("certificate", refusal, clean=False)
            transport.close()
            return
        self.log.info("connection.tls")
        key = certificate_key(self.client)
        if key is not None and (refused := self.server.admission.rekey(self, key)) is not None:
            self._refuse(refused, key)
            return
        self.handshake.tls_established()

    def _enter_transmission(self, done: HandshakeDone) -> None:
        assert self.transport is not None
        if self._deadline is not None:
            self._deadline.cancel()
        export = self.server.registry.get(done.export.name)
        assert export is not None
        export.attach()
        self.export = export
        self.export_name = export.name
        self.log = self.log.bind(export=export.name)
        self._context = MappingProxyType({**self._context, "export": export.name})
        limits = SessionLimits.for_export(
            done.export.size,
            done.flags,
            done.structured_replies,
            len(done.meta_contexts),
            done.export.max_payload,
        )
        self.dispatcher = Dispatcher(
            export,
            limits,
            done.meta_contexts,
            self._send,
            self.log,
            debug=self.settings.debug,
            max_in_flight=self.settings.max_requests_in_flight,
            on_busy=self._set_busy,
            on_released=self._released,
        )
        export.metrics.connection_opened()
        self._writer = ReplyWriter(self.transport, self._output_failed)
        self.parser = RequestParser()
        self.handshake = None
        self.phase = Phase.TRANSMISSION
        self.log.info(
            "connection.ready", structured_replies=done.structured_replies, flags=done.flags
        )
        self._last_request = self._loop.time()
        idle_timeout = self.settings.idle_timeout
        if idle_timeout:
            self._idle_timer = self._loop.call_later(idle_timeout, self._check_idle)
        if done.leftover:
            self._serve_all(self._parse(lambda parser: parser.receive(done.leftover)))

    def _check_idle(self) -> None:
        """Close a connection that sent no request for idle_timeout seconds (and has none
        in flight); checked by one timer, not per request."""
        timeout = self.settings.idle_timeout
        idle = self._loop.time() - self._last_request
        busy = self.dispatcher is not None and bool(self.dispatcher.tasks or self._backlog)
        if idle < timeout or busy:
            self._idle_timer = self._loop.call_later(max(timeout - idle, 0.05), self._check_idle)
            return
        self._idle_timer = None
        self.server.metrics.limit_hit("idle_timeout")
        self.log.info("connection.idle_timeout", idle_seconds=round(idle, 3))
        if self.transport is not None:
            self.transport.close()

    def idle_since(self) -> float | None:
        """When the last request arrived, if the connection is in transmission with nothing
        in flight: no request being served or waiting, no reply unsent, no payload arriving
        (admission may then evict it)."""
        dispatcher, writer, parser = self.dispatcher, self._writer, self.parser
        if dispatcher is None or writer is None or parser is None or self._closer is not None:
            return None
        if dispatcher.tasks or self._backlog or parser.awaiting_payload:
            return None
        if self._write_paused or writer.blocked or writer.buffered():
            return None
        return self._last_request

    def evict(self, idle_seconds: float) -> None:
        """Give the slot to a new connection. Nothing is in flight (idle_since) and NBD has
        no server-initiated disconnect message: closing the transport is the clean end."""
        self.server.metrics.limit_hit("evicted_idle")
        self.log.info("connection.evicted", idle_seconds=round(idle_seconds, 3))
        if self.transport is not None:
            self.transport.close()

    def _refuse(self, limit: str, key: str) -> None:
        """Admission said no: count, log and drop the connection before it is served."""
        self.server.metrics.limit_hit(limit)
        value = self.server.admission.limit(limit)
        self.log.warning("connection.refused", limit=limit, client_key=key, **{limit: value})
        self.handshake = None
        if self.transport is not None:
            self.transport.abort()

    def _limit_hit(self, limit: str, export: str) -> None:
        self.server.metrics.limit_hit(limit)
        self.log.warning("connection.refused", limit=limit, export=export)

    def _handshake_expired(self) -> None:
        if self.handshake is not None and self.transport is not None:
            reason = f"no export chosen within {self.settings.handshake_timeout} s"
            self._handshake_failed("timeout", reason, clean=False)
            self.transport.abort()

    def _handshake_failed(self, code: str, reason: str, *, clean: bool) -> None:
        """Count and log a connection that ended before transmission (once)."""
        self.handshake = None
        self.server.metrics.handshake_failed(code)
        log = self.log.info if clean else self.log.warning
        log("handshake.failed", reason_code=code, reason=reason)

    # -- transmission ----------------------------------------------------------------

    def _receive_requests(self, nbytes: int) -> None:
        self._last_request = self._loop.time()  # idle_timeout and eviction measure from it
        self._serve_all(self._parse(lambda parser: parser.buffer_updated(nbytes)))

    def _parse(self, feed: Any) -> list[Event]:
        assert self.parser is not None and self.transport is not None
        try:
            events: list[Event] = feed(self.parser)
        except ProtocolViolation as err:
            self.log.warning("protocol.violation", reason=str(err))
            self.transport.abort()
            return []
        return events

    def _serve_all(self, events: list[Event]) -> None:
        """Hand events to the dispatcher in order; while too many replies are pending, keep
        the rest in a backlog (reading is paused meanwhile).

        Replies made meanwhile are gathered and written once, as one writev, instead of one
        send per reply: with many requests per receive that is most of the syscalls.

        One receive can hold thousands of pipelined requests: past TURN_BUDGET of loop time
        the rest waits in the backlog (reading paused) and continues on a later loop turn,
        so every other connection is served in between.
        """
        dispatcher, writer = self.dispatcher, self._writer
        assert dispatcher is not None and writer is not None
        backlog = self._backlog
        backlog.extend(events)
        deadline = perf_counter() + TURN_BUDGET
        budget = self._budget  # checked per request; the budget itself per batch
        limit = budget.allowance(self._account) if budget.used else budget.per_connection
        full = False
        token = connection_context.set(self._context)
        writer.cork()
        try:
            while backlog and not self._busy and not self._over_budget:
                event = backlog.popleft()
                if event.__class__ is not Data and event.command == _DISC:  # type: ignore[union-attr]
                    self._disconnect()
                    return
                dispatcher.receive(event)
                if backlog and writer.buffered() > limit:  # payload bytes: per batch
                    full = True  # _check_budget below decides: stop reading, or go on later
                    break
                if backlog and perf_counter() >= deadline:
                    self._yield_turn()
                    break
        finally:
            writer.uncork()
            connection_context.reset(token)
        self._check_budget()  # what uncork sent may have fit at once
        if full and not self._over_budget and not self._yielded:
            self._yield_turn()

    def _yield_turn(self) -> None:
        self._yielded = True
        self._set_reading()
        self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """Scheduled with call_soon: runs on the loop's next iteration, after the I/O
        callbacks of every other connection that was ready meanwhile."""
        self._yielded = False
        if self.phase is not Phase.TRANSMISSION:
            return
        self._serve_all([])
        self._set_reading()

    def _release_backlog(self) -> None:
        for event in self._backlog:
            if event.__class__ is Data:
                event.release()
        self._backlog.clear()

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: stop reading, finish what is in flight, then close."""
        self._release_backlog()
        self.phase = Phase.CLOSING
        self._set_reading()
        self.log.debug("connection.disc")
        self._start_closing()

    async def close_after_drain(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.drain()
        if self.transport is not None:
            self.transport.close()

    def begin_shutdown(self) -> None:
        """Server is stopping: answer new requests with ESHUTDOWN; close when drained."""
        if self.dispatcher is None:
            if self.transport is not None:
                self.transport.close()
            return
        self.dispatcher.shutting_down = True
        self._start_closing()

    def _start_closing(self) -> None:
        if self._closer is None:
            self._closer = asyncio.ensure_future(self.close_after_drain())

    def _send(self, pieces: Sequence[Piece]) -> None:
        if self._writer is not None:
            self._writer.send(pieces)

    def _output_failed(self, err: OSError) -> None:
        """A reply's data could not be read or sent after its header was: the stream can
        no longer be framed, so the connection ends (quietly if the client left)."""
        gone = err.errno in (errno.EPIPE, errno.ECONNRESET)
        (self.log.debug if gone else self.log.warning)("connection.send_failed", error=repr(err))
        if self.transport is not None:
            self.transport.abort()

    def _set_busy(self, busy: bool) -> None:
        if busy:
            self.server.metrics.limit_hit("max_requests_in_flight")
        self._busy = busy
        if not busy and self._backlog and self.phase is Phase.TRANSMISSION:
            self._serve_all([])
        self._set_reading()

    def _set_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if (
            self._write_paused
            or self.phase is not Phase.TRANSMISSION
            or self._busy
            or self._yielded
            or self._over_budget
        ):
            transport.pause_reading()
        else:
            transport.resume_reading()


def _size_send_buffer(transport: asyncio.Transport, size: int) -> None:
    """Let the kernel hold a deep queue of replies. With the default (~208 KiB) a client
    keeping 16 x 64 KiB reads in flight fills it at once; the transport then buffers, pauses
    us, and the server idles until the client drains: 64k mixed I/O measured ~1.9 GiB/s at
    the default and ~2.9 GiB/s with 4 MiB (bench/RESULTS.md)."""
    sock = transport.get_extra_info("socket")
    if size and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unix"
