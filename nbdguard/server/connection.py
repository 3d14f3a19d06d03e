"""asyncio glue for one client connection: receive into the protocol's buffers,
hand events to the dispatcher, and write replies with transport-level backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from nbdguard.protocol.constants import Command
from nbdguard.protocol.handshake import Handshake, HandshakeClosed, HandshakeDone, StartTls
from nbdguard.protocol.transmission import ProtocolViolation, Request, RequestParser
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


class Connection(asyncio.BufferedProtocol):
    """One NBD client, from greeting to disconnect."""

    def __init__(self, server: Server, listener: str) -> None:
        self.server = server
        self.id = next(_ids)
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
        self._stopped_reading = False
        self._busy = False  # too many replies being worked on: stop reading requests
        self._yielded = False  # turn budget spent with requests left: others go first
        self._over_budget = False  # replies hold too many bytes: serve more once they drain
        self._budget = server.config.server.max_buffered_bytes_per_connection
        self._backlog: deque[Request] = deque()
        self._closer: asyncio.Future[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._lost = False
        self._writer: ReplyWriter | None = None  # made when transmission starts
        self._loop = asyncio.get_running_loop()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_request = 0.0

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport = self.transport
        peer = transport.get_extra_info("peername")
        self.log = self.log.bind(client=_format_peer(peer))
        self.client = ClientIdentity.from_peer(peer)
        key = client_key(self.client, transport.get_extra_info("socket"))
        refused = self.server.admission.admit(self, key, self._loop.time())
        if refused is not None:
            self._refuse(refused, key)
            return
        self.server.connections.add(self)
        _size_send_buffer(transport, self.server.config.server.send_buffer)
        self.handshake = Handshake(
            ClientView(self.server.registry, self.client, self._limit_hit),
            self.server.handshake_limits,
            tls_mode=self.server.config.server.tls.mode,
        )
        transport.write(self.handshake.data_to_send())
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.server.handshake_timeout, self._handshake_expired)
        self.log.debug("connection.opened")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.parser is not None:
            return self.parser.get_buffer()
        return self._handshake_view

    def buffer_updated(self, nbytes: int) -> None:
        if self.parser is not None:
            self._receive_requests(nbytes)
        elif self.handshake is not None:
            self._receive_handshake(self._handshake_view[:nbytes])

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:  # a failed TLS upgrade may report the loss twice
            return
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        self.server.connections.discard(self)
        self.server.admission.release(self)
        self._backlog.clear()
        if self.handshake is not None:
            self._handshake_failed("disconnected", "client closed during the handshake", clean=True)
        if self.dispatcher is not None:
            self.dispatcher.shutting_down = True
            self.dispatcher.metrics.connection_closed()
        if self.export is not None:
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

    def _check_budget(self) -> None:
        """Replies held past the byte budget have drained: serve the backlog again."""
        writer = self._writer
        if self._over_budget and writer is not None and writer.buffered() <= self._budget:
            self._over_budget = False
            self._loop.call_soon(self._next_turn)

    # -- handshake -------------------------------------------------------------------

    def _receive_handshake(self, data: memoryview) -> None:
        assert self.handshake is not None and self.transport is not None
        event = self.handshake.receive(data)
        pending = self.handshake.data_to_send()
        if pending:
            self.transport.write(pending)
        if isinstance(event, HandshakeClosed):
            self._handshake_failed(event.code, event.reason, clean=event.clean)
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
                ssl_handshake_timeout=self.server.handshake_timeout,
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
            debug=self.server.debug,
            max_in_flight=self.server.config.server.max_requests_in_flight,
            on_busy=self._set_busy,
        )
        export.metrics.connection_opened()
        self._writer = ReplyWriter(self.transport, self._output_failed)
        self.parser = RequestParser(done.export.max_payload)
        self.handshake = None
        self.log.info(
            "connection.ready", structured_replies=done.structured_replies, flags=done.flags
        )
        self._last_request = self._loop.time()
        idle_timeout = self.server.config.server.idle_timeout
        if idle_timeout:
            self._idle_timer = self._loop.call_later(idle_timeout, self._check_idle)
        if done.leftover:
            self._serve_all(self._parse(lambda parser: parser.receive(done.leftover)))

    def _check_idle(self) -> None:
        """Close a connection that sent no request for idle_timeout seconds (and has none
        in flight); checked by one timer, not per request."""
        timeout = self.server.config.server.idle_timeout
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
            reason = f"no export chosen within {self.server.handshake_timeout} s"
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
        parser = self.parser
        if parser is not None and not self._backlog:
            partial = parser.partial_write()  # every request before it has been served
            if partial is not None:
                assert self.dispatcher is not None
                self.dispatcher.payload_arrived(*partial)

    def _parse(self, feed: Any) -> list[Request]:
        assert self.parser is not None and self.transport is not None
        try:
            requests: list[Request] = feed(self.parser)
        except ProtocolViolation as err:
            self.log.warning("protocol.violation", reason=str(err))
            self.transport.abort()
            return []
        return requests

    def _serve_all(self, requests: list[Request]) -> None:
        """Serve requests in order; while too many replies are pending, keep the rest in a
        backlog (reading is paused, so their payload views stay valid until served).

        Replies made meanwhile are gathered and written once, as one writev, instead of one
        send per reply: with many requests per receive that is most of the syscalls.

        One receive can hold thousands of pipelined requests: past TURN_BUDGET of loop time
        the rest waits in the backlog (reading paused) and continues on a later loop turn,
        so every other connection is served in between.
        """
        dispatcher, writer = self.dispatcher, self._writer
        assert dispatcher is not None and writer is not None
        self._backlog.extend(requests)
        deadline = perf_counter() + TURN_BUDGET
        writer.cork()
        try:
            while self._backlog and not self._busy:
                request = self._backlog.popleft()
                if request.command == _DISC:
                    self._backlog.clear()
                    self._disconnect()
                    return
                dispatcher.handle(request)
                if self._backlog and writer.buffered() > self._budget:
                    self._over_budget = True  # resume_writing serves the rest
                    self.server.metrics.limit_hit("max_buffered_bytes_per_connection")
                    self._set_reading()
                    return
                if self._backlog and perf_counter() >= deadline:
                    self._yield_turn()
                    return
        finally:
            writer.uncork()
            self._check_budget()  # what uncork sent may have fit at once

    def _yield_turn(self) -> None:
        self._yielded = True
        self._set_reading()
        self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """Scheduled with call_soon: runs on the loop's next iteration, after the I/O
        callbacks of every other connection that was ready meanwhile."""
        self._yielded = False
        if self._lost or self.dispatcher is None or self._writer is None:
            return
        self._serve_all([])
        self._set_reading()

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: stop reading, finish what is in flight, then close."""
        self._stopped_reading = True
        self._set_reading()
        self.parser = None
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
        if not busy and self._backlog:
            self._serve_all([])
        self._set_reading()

    def _set_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if (
            self._write_paused
            or self._stopped_reading
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
