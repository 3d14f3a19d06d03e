"""Frame transmission requests from raw bytes and validate them: no sockets."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdguard.protocol.constants import Command, CommandFlag, NBDError
from nbdguard.protocol.transmission import (
    MIN_ROOM,
    RECEIVE_BUFFER,
    Data,
    Event,
    ProtocolViolation,
    Request,
    RequestParser,
)
from nbdguard.protocol.validate import SessionLimits, validate
from tests.protocol.nbdwire import receive_in_pieces, request

MAX = 32 << 20


def requests_of(events: list[Event]) -> list[Request]:
    return [event for event in events if isinstance(event, Request)]


def payloads(events: list[Event], *, release: bool = True) -> dict[int, bytes]:
    """Each WRITE's payload, put together from its pieces (checking they are in order and
    end with exactly one final piece); with `release`, pieces are released once copied."""
    got: dict[int, bytearray] = {}
    done: set[int] = set()
    for event in events:
        if isinstance(event, Data):
            cookie = event.request.cookie
            assert cookie not in done
            gathered = got.setdefault(cookie, bytearray())
            assert event.at == len(gathered)
            gathered += event.data
            if event.final:
                assert len(gathered) == event.request.length
                done.add(cookie)
            if release:
                event.release()
    assert done == set(got)
    return {cookie: bytes(data) for cookie, data in got.items()}


def test_read_header_parses() -> None:
    parser = RequestParser()
    [req] = parser.receive(request(Command.READ, 4096, 512, cookie=0xABCDEF))
    assert isinstance(req, Request)
    assert (req.command, req.offset, req.length, req.cookie) == (0, 4096, 512, 0xABCDEF)


def test_many_requests_in_one_chunk_and_split_headers() -> None:
    stream = b"".join(request(Command.READ, i * 512, 512, cookie=i) for i in range(100))
    parser = RequestParser()
    got: list[Event] = []
    for i in range(0, len(stream), 13):
        got += parser.receive(stream[i : i + 13])
    assert [r.cookie for r in requests_of(got)] == list(range(100))


def test_write_payload_is_framed() -> None:
    data = bytes(range(256)) * 8
    stream = request(Command.WRITE, 0, len(data), cookie=7) + data + request(Command.FLUSH)
    [write, piece, flush] = RequestParser().receive(stream)
    assert isinstance(write, Request) and isinstance(piece, Data) and isinstance(flush, Request)
    assert piece.request is write and piece.final and piece.at == 0
    assert bytes(piece.data) == data and flush.command == Command.FLUSH


def test_empty_write_ends_with_one_empty_final_piece() -> None:
    [write, piece, read] = RequestParser().receive(
        request(Command.WRITE, 0, 0, cookie=3) + request(Command.READ, cookie=4)
    )
    assert isinstance(piece, Data) and piece.request is write and piece.final
    assert len(piece.data) == 0 and isinstance(read, Request) and read.cookie == 4


def test_pieces_are_views_of_the_receive_buffer_not_copies() -> None:
    parser = RequestParser()
    stream = request(Command.WRITE, 0, 4096, cookie=1) + b"x" * 4096
    target = parser.get_buffer()
    target[: len(stream)] = stream
    [_, piece] = parser.buffer_updated(len(stream))
    assert isinstance(piece, Data) and isinstance(piece.data, memoryview)
    assert piece.data.obj is target.obj and bytes(piece.data) == b"x" * 4096
    assert parser.leased == 4096
    piece.release()
    piece.release()  # twice is harmless
    assert parser.leased == 0


def test_an_announced_payload_allocates_nothing() -> None:
    """A header announcing 64 MiB costs no memory: the payload flows through the receive
    buffer as pieces, as it arrives (even past the maximum payload, which the consumer
    refuses; the stream stays framed)."""
    parser = RequestParser()
    length = 64 << 20
    [write] = parser.receive(request(Command.WRITE, 0, length, cookie=9))
    chunk = bytes(1 << 20)
    received = 0
    for _ in range(64):
        events = parser.receive(chunk)
        assert parser.get_buffer().nbytes <= RECEIVE_BUFFER
        for event in events:
            assert isinstance(event, Data) and event.request is write
            received += len(event.data)
            event.release()
    assert received == length and not parser.awaiting_payload
    [after] = parser.receive(request(Command.READ, 0, 512, cookie=10))
    assert isinstance(after, Request) and after.cookie == 10  # still framed
    limits = SessionLimits(1 << 30, False, False, False, MAX)
    assert isinstance(write, Request) and validate(write, limits) == NBDError.EINVAL


def test_a_held_piece_is_never_overwritten_by_the_next_receive() -> None:
    """The buffer-reuse bug, deterministically: a WRITE completes, its piece is kept (as a
    backlog or a slow retry keeps it), and the next WRITE's bytes arrive when the receive
    buffer must be compacted. They go to a fresh buffer; the held bytes stay the first
    write's."""
    parser = RequestParser()
    first_length = RECEIVE_BUFFER - MIN_ROOM // 2  # leaves less room than a receive needs
    first = request(Command.WRITE, 0, first_length, cookie=1) + b"A" * first_length
    second = request(Command.WRITE, 0, 4096, cookie=2)
    events: list[Event] = []
    for batch in receive_in_pieces(parser, first + second[:10]):
        events += batch
    held = [event for event in events if isinstance(event, Data)]
    for batch in receive_in_pieces(parser, second[10:] + b"B" * 4096):
        events += batch
    assert b"".join(bytes(piece.data) for piece in held) == b"A" * first_length
    assert payloads(events) == {1: b"A" * first_length, 2: b"B" * 4096}


def test_bad_magic_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        RequestParser().receive(b"\0" * 28)


def test_truncated_header_waits() -> None:
    parser = RequestParser()
    header = request(Command.READ, 0, 512)
    assert parser.receive(header[:27]) == []
    [req] = parser.receive(header[27:])
    assert isinstance(req, Request) and req.length == 512 and not parser.awaiting_payload


LIMITS = SessionLimits(
    size=1 << 20, read_only=False, structured_replies=True, has_meta_context=True, max_payload=MAX
)


def _req(command: int, offset: int = 0, length: int = 512, flags: int = 0) -> Request:
    return Request(flags, command, 1, offset, length)


@pytest.mark.parametrize(
    ("req", "limits", "expected"),
    [
        (_req(Command.READ), LIMITS, NBDError.OK),
        (_req(Command.READ, (1 << 20) - 511), LIMITS, NBDError.EINVAL),
        (_req(Command.WRITE, (1 << 20) - 511), LIMITS, NBDError.ENOSPC),
        (_req(Command.WRITE_ZEROES, 1 << 20), LIMITS, NBDError.ENOSPC),
        (_req(Command.TRIM, 1 << 21), LIMITS, NBDError.EINVAL),
        (
            _req(Command.READ, 0, MAX + 1),
            SessionLimits(1 << 30, False, True, True, MAX),
            NBDError.EOVERFLOW,
        ),
        (_req(Command.WRITE), SessionLimits(1 << 20, True, True, True, MAX), NBDError.EPERM),
        (_req(Command.TRIM), SessionLimits(1 << 20, True, True, True, MAX), NBDError.EPERM),
        (_req(Command.WRITE_ZEROES), SessionLimits(1 << 20, True, True, True, MAX), NBDError.EPERM),
        (_req(Command.FLUSH, 0, 0), SessionLimits(1 << 20, True, True, True, MAX), NBDError.OK),
        (_req(99), LIMITS, NBDError.EINVAL),
        (_req(Command.READ, flags=CommandFlag.FUA), LIMITS, NBDError.EINVAL),
        (_req(Command.READ, flags=1 << 9), LIMITS, NBDError.EINVAL),
        (_req(Command.WRITE, flags=1 << 7), LIMITS, NBDError.EINVAL),
        (_req(Command.READ, flags=CommandFlag.DF), LIMITS, NBDError.OK),
        (
            _req(Command.READ, flags=CommandFlag.DF),
            SessionLimits(1 << 20, False, False, False, MAX),
            NBDError.EINVAL,
        ),
        (
            _req(Command.BLOCK_STATUS),
            SessionLimits(1 << 20, False, True, False, MAX),
            NBDError.EINVAL,
        ),
        (_req(Command.BLOCK_STATUS, 0, 0), LIMITS, NBDError.EINVAL),
        (_req(Command.BLOCK_STATUS, flags=CommandFlag.REQ_ONE), LIMITS, NBDError.OK),
        (
            _req(
                Command.WRITE_ZEROES,
                flags=int(CommandFlag.FAST_ZERO | CommandFlag.NO_HOLE | CommandFlag.FUA),
            ),
            LIMITS,
            NBDError.OK,
        ),
        (_req(Command.TRIM, 0, 1 << 20), LIMITS, NBDError.OK),
        (_req(Command.CACHE, 0, 1 << 20), LIMITS, NBDError.OK),
    ],
)
def test_validate(req: Request, limits: SessionLimits, expected: NBDError) -> None:
    assert validate(req, limits) == expected


def test_huge_trim_is_not_limited_by_max_payload() -> None:
    limits = SessionLimits(1 << 40, False, True, True, MAX)
    assert validate(_req(Command.TRIM, 0, 0xFFFFFFFF), limits) == NBDError.OK


PIECE_SCALE = 3 * MIN_ROOM  # payload lengths around the receive buffer's size


def stream_of(commands: list[tuple[Command, int]]) -> bytes:
    stream = b""
    for cookie, (command, length) in enumerate(commands):
        stream += request(command, 0, length, cookie=cookie)
        if command == Command.WRITE:
            stream += bytes([cookie % 256]) * length
    return stream


COMMANDS = st.lists(
    st.tuples(st.sampled_from(list(Command)), st.integers(0, PIECE_SCALE)), max_size=20
)


@settings(max_examples=300, deadline=None)
@given(COMMANDS, st.integers(5, 70000), st.booleans())
def test_any_valid_stream_frames_identically_in_any_chunking(
    commands: list[tuple[Command, int]], chunk: int, hold: bool
) -> None:
    """Pieces either copied and released at once, or all held to the end: receive() feeds
    many receives in a row, the case that once mixed two writes' payloads."""
    stream = stream_of(commands)
    parser = RequestParser()
    got: list[Event] = []
    copied: list[Event] = []
    for i in range(0, len(stream), chunk):
        batch = parser.receive(stream[i : i + chunk])
        got += batch
        for event in batch:
            if isinstance(event, Data) and not hold:
                copy = memoryview(bytes(event.data))
                event.release()
                copied.append(Data(event.request, event.at, copy, event.final, None))
            else:
                copied.append(event)
    assert [r.cookie for r in requests_of(got)] == list(range(len(commands)))
    writes = {
        cookie: bytes([cookie % 256]) * length
        for cookie, (command, length) in enumerate(commands)
        if command == Command.WRITE
    }
    assert payloads(copied, release=False) == writes
    assert hold or parser.leased == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_protocol_violation(data: bytes) -> None:
    parser = RequestParser()
    with contextlib.suppress(ProtocolViolation):
        parser.receive(data)


def test_header_struct_is_28_bytes() -> None:
    assert len(request(Command.READ)) == 28 == struct.calcsize(">IHHQQI")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, PIECE_SCALE), min_size=1, max_size=12),
    st.integers(5, 300_000),
    st.integers(0, 3),
)
def test_held_pieces_never_mix_requests(lengths: list[int], chunk: int, hold: int) -> None:
    """Received as asyncio does (get_buffer/buffer_updated), with the pieces of the last
    `hold` receives kept unreleased, as a backlog keeps them, and read only when released:
    every payload intact."""
    stream = b"".join(
        request(Command.WRITE, 0, length, cookie=i) + bytes([i + 1]) * length
        for i, length in enumerate(lengths)
    )
    parser = RequestParser()
    gathered: list[Event] = []
    held: list[list[Data]] = []

    def release(pieces: list[Data]) -> None:
        for piece in pieces:
            copy = memoryview(bytes(piece.data))
            piece.release()
            gathered.append(Data(piece.request, piece.at, copy, piece.final, None))

    for batch in receive_in_pieces(parser, stream, chunk):
        held.append([event for event in batch if isinstance(event, Data)])
        while len(held) > hold:
            release(held.pop(0))
    while held:
        release(held.pop(0))
    expected = {i: bytes([i + 1]) * length for i, length in enumerate(lengths)}
    assert payloads(gathered, release=False) == expected
    assert parser.leased == 0
