"""Sans-I/O state machine for the fixed-newstyle handshake (option haggling).

Feed it the bytes the client sent; it answers with bytes to send and, at the end,
one terminal event: `HandshakeDone` (enter transmission) or `HandshakeClosed`.
It never buffers more than `max_option_length` bytes: larger option payloads are
skipped as they stream past and answered with NBD_REP_ERR_TOO_BIG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from nbdguard.protocol import wire
from nbdguard.protocol.constants import (
    IHAVEOPT,
    MAX_STRING,
    META_CONTEXTS,
    ClientFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export."""

    name: str
    description: str
    size: int
    flags: int  # transmission flags, HAS_FLAGS included
    min_block: int
    preferred_block: int
    max_payload: int


class ExportDirectory(Protocol):
    """The server's exports as the handshake sees them (a per-client view)."""

    def visible_exports(self) -> Iterable[ExportInfo]: ...

    def find(self, name: str) -> ExportInfo | None: ...

    def admit(self, name: str) -> str | None:
        """Why a client may not start using this export now (None: it may)."""


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    max_options: int = 64
    max_option_length: int = 16 * 1024


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    export: ExportInfo
    flags: int  # the transmission flags actually sent
    structured_replies: bool
    meta_contexts: tuple[int, ...]  # selected metadata context ids
    leftover: bytes  # transmission-phase bytes that arrived with the last option


@dataclass(frozen=True, slots=True)
class HandshakeClosed:
    reason: str  # human-readable
    clean: bool  # the client asked (ABORT); False = protocol violation
    # Stable, for metrics: a clean ABORT is "list" (after NBD_OPT_LIST), "info" (after an
    # answered NBD_OPT_INFO or LIST_META_CONTEXT) or "aborted"; else unknown_export, …
    code: str = "protocol_violation"


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS was acknowledged: upgrade the transport, then call `tls_established`
    (or close the connection if the TLS handshake fails). Feed no bytes in between."""


HandshakeEvent = HandshakeDone | HandshakeClosed | StartTls
TLS_MODES = ("off", "on", "require")
CLEAN_CODES = ("list", "info", "aborted")


class OptionError(Exception):
    """An option request the server answers with an error reply (the session continues)."""

    def __init__(self, reply: OptionReply, message: str) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(slots=True)
class _MetaSelection:
    export_name: str
    context_ids: tuple[int, ...]


@dataclass(slots=True)
class _State:
    client_flags: int | None = None
    options_seen: int = 0
    structured_replies: bool = False
    meta: _MetaSelection | None = None
    asked: str | None = None  # "list" or "info" once such a query was answered
    # The option header being received: (option, length); None while awaiting a header.
    pending: tuple[int, int] | None = None
    skipping: int = 0  # bytes of an oversized option payload still to discard
    buffer: bytearray = field(default_factory=bytearray)


class Handshake:
    """Server side of the fixed-newstyle handshake."""

    def __init__(
        self,
        directory: ExportDirectory,
        limits: HandshakeLimits | None = None,
        *,
        tls_mode: str = "off",
    ) -> None:
        assert tls_mode in TLS_MODES
        self._directory = directory
        self._limits = limits or HandshakeLimits()
        self._state = _State()
        self._out = bytearray(wire.greeting())
        self._event: HandshakeEvent | None = None
        self._tls_mode = tls_mode
        self.tls = False  # TLS is established
        self._upgrading = False  # STARTTLS acknowledged, TLS not yet established

    def tls_established(self) -> None:
        """The transport is now TLS: forget everything negotiated before (the spec's rule,
        so a man in the middle cannot have chosen it)."""
        assert self._upgrading
        self._upgrading = False
        self.tls = True
        state = self._state
        state.structured_replies = False
        state.meta = None

    @property
    def no_zeroes(self) -> bool:
        flags = self._state.client_flags or 0
        return bool(flags & ClientFlag.NO_ZEROES)

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now (the greeting first)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive(self, data: bytes | bytearray | memoryview) -> HandshakeEvent | None:
        """Consume client bytes; return the terminal event once there is one."""
        if self._event is not None:
            return self._event
        state = self._state
        state.buffer += data
        while self._event is None and not self._upgrading and self._step():
            pass
        if self._upgrading and self._event is None:
            if state.buffer:  # the client must wait for the ACK before the TLS handshake
                self._close("data after NBD_OPT_STARTTLS before the TLS handshake", "tls")
                return self._event
            return StartTls()
        return self._event

    def _step(self) -> bool:
        """Advance by one unit of input; False when more bytes are needed."""
        state = self._state
        if state.client_flags is None:
            return self._read_client_flags()
        if state.skipping:
            return self._skip_payload()
        if state.pending is None:
            return self._read_option_header()
        option, length = state.pending
        if len(state.buffer) < length:
            return False
        payload = bytes(state.buffer[:length])
        del state.buffer[:length]
        state.pending = None
        self._handle(option, payload)
        return True

    def _read_client_flags(self) -> bool:
        state = self._state
        if len(state.buffer) < 4:
            return False
        (flags,) = wire.CLIENT_FLAGS.unpack_from(state.buffer)
        del state.buffer[:4]
        if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
            return self._close(f"unknown client flags {flags:#x}", "bad_client_flags")
        state.client_flags = flags
        return True

    def _read_option_header(self) -> bool:
        state = self._state
        if len(state.buffer) < wire.OPTION_HEADER.size:
            return False
        magic, option, length = wire.OPTION_HEADER.unpack_from(state.buffer)
        del state.buffer[: wire.OPTION_HEADER.size]
        if magic != IHAVEOPT:
            return self._close(f"bad option magic {magic:#x}", "bad_option_magic")
        state.options_seen += 1
        if state.options_seen > self._limits.max_options:
            return self._close("too many options", "too_many_options")
        if length > self._limits.max_option_length:
            if option == Option.EXPORT_NAME:
                return self._close("oversized NBD_OPT_EXPORT_NAME", "oversized_option")
            state.skipping = length
            state.pending = (option, 0)
            return True
        state.pending = (option, length)
        return True

    def _skip_payload(self) -> bool:
        state = self._state
        taken = min(state.skipping, len(state.buffer))
        del state.buffer[:taken]
        state.skipping -= taken
        if state.skipping:
            return False
        assert state.pending is not None
        option = state.pending[0]
        state.pending = None
        self._reply(option, OptionReply.ERR_TOO_BIG, b"option payload too large")
        return True

    def _close(self, reason: str, code: str) -> bool:
        self._event = HandshakeClosed(reason, code in CLEAN_CODES, code)
        return False

    def _reply(self, option: int, reply: OptionReply, payload: bytes = b"") -> None:
        self._out += wire.option_reply(option, reply, payload)

    def _handle(self, option: int, payload: bytes) -> None:
        if self._tls_mode == "require" and not self.tls and option not in _BEFORE_TLS:
            if option == Option.EXPORT_NAME:  # cannot be answered with an error
                self._close("NBD_OPT_EXPORT_NAME before STARTTLS (TLS required)", "tls_required")
                return
            self._reply(option, OptionReply.ERR_TLS_REQD, b"TLS required: use NBD_OPT_STARTTLS")
            return
        handler = _HANDLERS.get(option)
        if handler is None:
            self._reply(option, OptionReply.ERR_UNSUP, b"option not supported")
            return
        try:
            handler(self, option, payload)
        except OptionError as err:
            self._reply(option, err.reply, str(err).encode())

    # -- option handlers -------------------------------------------------------

    def _opt_export_name(self, option: int, payload: bytes) -> None:
        name = _decode(payload)
        export = self._directory.find(name)
        if export is None:
            self._close(f"unknown export {name!r} (NBD_OPT_EXPORT_NAME)", "unknown_export")
            return
        refusal = self._directory.admit(name)
        if refusal is not None:
            self._close(f"export {name!r} refused: {refusal}", "export_busy")
            return
        flags = self._flags_for(export)
        self._out += wire.export_name_reply(export.size, flags, self.no_zeroes)
        self._finish(export)

    def _opt_abort(self, option: int, payload: bytes) -> None:
        self._reply(option, OptionReply.ACK)
        asked = self._state.asked
        after = f" after NBD_OPT_{asked.upper()}" if asked else ""
        self._close(f"client sent NBD_OPT_ABORT{after}", asked or "aborted")

    def _answered(self, query: str) -> None:
        """A LIST outranks an INFO in how the session is counted."""
        if self._state.asked != "list":
            self._state.asked = query

    def _opt_list(self, option: int, payload: bytes) -> None:
        if payload:
            raise OptionError(OptionReply.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for export in self._directory.visible_exports():
            entry = wire.server_entry(export.name.encode(), export.description.encode())
            self._reply(option, OptionReply.SERVER, entry)
        self._reply(option, OptionReply.ACK)
        self._answered("list")

    def _opt_info_or_go(self, option: int, payload: bytes) -> None:
        name, requests = _parse_info_request(payload)
        export = self._directory.find(name)
        if export is None:
            raise OptionError(OptionReply.ERR_UNKNOWN, f"unknown export {name!r}")
        if option == Option.GO:
            refusal = self._directory.admit(name)
            if refusal is not None:
                raise OptionError(OptionReply.ERR_POLICY, refusal)
        info = wire.info_export(export.size, self._flags_for(export))
        self._reply(option, OptionReply.INFO, info)
        if Info.NAME in requests:
            self._reply(option, OptionReply.INFO, wire.info_string(Info.NAME, export.name.encode()))
        if Info.DESCRIPTION in requests and export.description:
            text = export.description.encode()
            self._reply(option, OptionReply.INFO, wire.info_string(Info.DESCRIPTION, text))
        sizes = wire.info_block_size(export.min_block, export.preferred_block, export.max_payload)
        self._reply(option, OptionReply.INFO, sizes)
        self._reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._finish(export)
        else:
            self._answered("info")

    def _opt_starttls(self, option: int, payload: bytes) -> None:
        if self._tls_mode == "off":
            raise OptionError(OptionReply.ERR_POLICY, "TLS is not configured on this server")
        if payload:
            raise OptionError(OptionReply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls:
            raise OptionError(OptionReply.ERR_INVALID, "TLS is already established")
        self._reply(option, OptionReply.ACK)
        self._upgrading = True

    def _opt_structured_reply(self, option: int, payload: bytes) -> None:
        if payload:
            raise OptionError(OptionReply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self._state.structured_replies:
            raise OptionError(OptionReply.ERR_INVALID, "structured replies already negotiated")
        self._state.structured_replies = True
        self._reply(option, OptionReply.ACK)

    def _opt_meta_context(self, option: int, payload: bytes) -> None:
        if not self._state.structured_replies:
            raise OptionError(OptionReply.ERR_INVALID, "negotiate structured replies first")
        name, queries = _parse_meta_request(payload)
        if self._directory.find(name) is None:
            raise OptionError(OptionReply.ERR_UNKNOWN, f"unknown export {name!r}")
        listing = option == Option.LIST_META_CONTEXT
        matched = _match_contexts(queries, listing)
        for context in matched:
            context_id = 0 if listing else META_CONTEXTS[context]
            reply = wire.meta_context(context_id, context.encode())
            self._reply(option, OptionReply.META_CONTEXT, reply)
        if not listing:
            ids = tuple(META_CONTEXTS[context] for context in matched)
            self._state.meta = _MetaSelection(name, ids)
        self._reply(option, OptionReply.ACK)
        self._answered("info")

    def _flags_for(self, export: ExportInfo) -> int:
        """DF only makes sense (and is only allowed) with structured replies."""
        if self._state.structured_replies:
            return export.flags
        return export.flags & ~int(TransmissionFlag.SEND_DF)

    def _finish(self, export: ExportInfo) -> None:
        state = self._state
        contexts: tuple[int, ...] = ()
        if state.meta is not None and state.meta.export_name == export.name:
            contexts = state.meta.context_ids
        leftover = bytes(state.buffer)
        state.buffer.clear()
        flags = self._flags_for(export)
        self._event = HandshakeDone(export, flags, state.structured_replies, contexts, leftover)


_BEFORE_TLS = (Option.STARTTLS, Option.ABORT)
_HANDLERS: dict[int, Callable[[Handshake, int, bytes], None]] = {
    Option.EXPORT_NAME: Handshake._opt_export_name,
    Option.ABORT: Handshake._opt_abort,
    Option.LIST: Handshake._opt_list,
    Option.INFO: Handshake._opt_info_or_go,
    Option.GO: Handshake._opt_info_or_go,
    Option.STRUCTURED_REPLY: Handshake._opt_structured_reply,
    Option.STARTTLS: Handshake._opt_starttls,
    Option.LIST_META_CONTEXT: Handshake._opt_meta_context,
    Option.SET_META_CONTEXT: Handshake._opt_meta_context,
}


def _decode(raw: bytes) -> str:
    if len(raw) > MAX_STRING:
        raise OptionError(OptionReply.ERR_INVALID, "string longer than 4096 bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise OptionError(OptionReply.ERR_INVALID, "string is not UTF-8") from None


class _Reader:
    """Bounds-checked reads from an option payload; overruns are ERR_INVALID."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self._pos = 0

    def take(self, count: int) -> bytes:
        end = self._pos + count
        if end > len(self._payload):
            raise OptionError(OptionReply.ERR_INVALID, "option data is truncated")
        chunk = self._payload[self._pos : end]
        self._pos = end
        return chunk

    def u16(self) -> int:
        return int(wire.U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(wire.U32.unpack(self.take(4))[0])

    def string32(self) -> str:
        return _decode(self.take(self.u32()))

    def finish(self) -> None:
        if self._pos != len(self._payload):
            raise OptionError(OptionReply.ERR_INVALID, "trailing bytes in option data")


def _parse_info_request(payload: bytes) -> tuple[str, frozenset[int]]:
    reader = _Reader(payload)
    name = reader.string32()
    count = reader.u16()
    requests = frozenset(reader.u16() for _ in range(count))
    reader.finish()
    return name, requests


def _parse_meta_request(payload: bytes) -> tuple[str, list[str]]:
    reader = _Reader(payload)
    name = reader.string32()
    count = reader.u32()
    if count > 256:
        raise OptionError(OptionReply.ERR_TOO_BIG, "too many metadata context queries")
    queries = [reader.string32() for _ in range(count)]
    reader.finish()
    for query in queries:
        if ":" not in query:
            raise OptionError(OptionReply.ERR_INVALID, f"query {query!r} lacks a namespace")
    return name, queries


def _match_contexts(queries: list[str], listing: bool) -> list[str]:
    """The contexts the queries select, each once, in query order. Listing with no query
    lists all; listing with "namespace:" lists that namespace."""
    if not queries:
        return list(META_CONTEXTS) if listing else []
    matched: list[str] = []
    for query in queries:
        for context in META_CONTEXTS:
            whole_namespace = listing and query.endswith(":") and context.startswith(query)
            if (query == context or whole_namespace) and context not in matched:
                matched.append(context)
    return matched
