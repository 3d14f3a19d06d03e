"""Frame transmission requests from raw bytes and validate them: no sockets."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdguard.protocol.constants import Command, CommandFlag, NBDError
from nbdguard.protocol.transmission import (
    DIRECT_THRESHOLD,
    ProtocolViolation,
    Request,
    RequestParser,
)
from nbdguard.protocol.validate import SessionLimits, validate
from tests.protocol.nbdwire import receive_in_pieces, request

MAX = 32 << 20


def test_read_header_parses() -> None:
    parser = RequestParser(MAX)
    [req] = parser.receive(request(Command.READ, 4096, 512, cookie=0xABCDEF))
    assert (req.command, req.offset, req.length, req.cookie) == (0, 4096, 512, 0xABCDEF)
    assert req.payload is None


def test_many_requests_in_one_chunk_and_split_headers() -> None:
    stream = b"".join(request(Command.READ, i * 512, 512, cookie=i) for i in range(100))
    parser = RequestParser(MAX)
    got: list[Request] = []
    for i in range(0, len(stream), 13):
        got += parser.receive(stream[i : i + 13])
    assert [r.cookie for r in got] == list(range(100))


def test_write_payload_is_framed() -> None:
    data = bytes(range(256)) * 8
    stream = request(Command.WRITE, 0, len(data), cookie=7) + data + request(Command.FLUSH)
    [write, flush] = RequestParser(MAX).receive(stream)
    assert write.payload == data and flush.command == Command.FLUSH


def test_large_write_is_received_directly_into_its_payload() -> None:
    parser = RequestParser(MAX)
    data = bytes([0x5A]) * (1 << 20)
    assert parser.receive(request(Command.WRITE, 0, len(data)) + data[:100]) == []
    view = parser.get_buffer()
    assert len(view) == len(data) - 100  # the payload buffer itself, not the scratch area
    view[: len(view)] = data[100:]
    [write] = parser.buffer_updated(len(view))
    assert write.payload == data


def test_write_of_64_mib_is_consumed_not_buffered() -> None:
    parser = RequestParser(MAX)
    length = 64 << 20
    assert parser.receive(request(Command.WRITE, 0, length, cookie=9)) == []
    chunk = bytes(1 << 20)
    got: list[Request] = []
    for _ in range(64):
        got += parser.receive(chunk)
        assert parser.get_buffer().nbytes <= 256 * 1024  # scratch only: nothing accumulates
    [req] = got
    assert req.oversized and req.payload is None and req.cookie == 9
    [after] = parser.receive(request(Command.READ, 0, 512, cookie=10))
    assert after.cookie == 10  # still framed
    limits = SessionLimits(1 << 30, False, False, False, MAX)
    assert validate(req, limits) == NBDError.EINVAL


def test_bad_magic_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        RequestParser(MAX).receive(b"\0" * 28)


def test_truncated_header_waits() -> None:
    parser = RequestParser(MAX)
    header = request(Command.READ, 0, 512)
    assert parser.receive(header[:27]) == []
    [req] = parser.receive(header[27:])
    assert req.length == 512 and not parser.awaiting_payload


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


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(list(Command)), st.integers(0, 3 * DIRECT_THRESHOLD)), max_size=20
    ),
    st.integers(1, 70000),
)
def test_any_valid_stream_frames_identically_in_any_chunking(
    commands: list[tuple[Command, int]], chunk: int
) -> None:
    stream = b""
    for cookie, (command, length) in enumerate(commands):
        stream += request(command, 0, length, cookie=cookie)
        if command == Command.WRITE:
            stream += bytes([cookie % 256]) * length
    parser = RequestParser(MAX)
    got: list[Request] = []
    for i in range(0, len(stream), chunk):
        got += parser.receive(stream[i : i + chunk])
    assert [r.cookie for r in got] == list(range(len(commands)))
    for r in got:
        if r.command == Command.WRITE and r.length:
            assert r.payload == bytes([r.cookie % 256]) * r.length


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_protocol_violation(data: bytes) -> None:
    parser = RequestParser(MAX)
    with contextlib.suppress(ProtocolViolation):
        parser.receive(data)


def test_header_struct_is_28_bytes() -> None:
    assert len(request(Command.READ)) == 28 == struct.calcsize(">IHHQQI")


def feed_like_a_socket(parser: RequestParser, data: bytes, chunk: int) -> list[tuple[int, bytes]]:
    """Receive through get_buffer/buffer_updated as asyncio does, serving each batch at once
    (payload views are only valid until the next get_buffer)."""
    return [
        (req.cookie, bytes(req.payload) if req.payload is not None else b"")
        for batch in receive_in_pieces(parser, data, chunk)
        for req in batch
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 3 * DIRECT_THRESHOLD), min_size=1, max_size=12),
    st.integers(1, 300_000),
)
def test_reused_payload_buffers_never_mix_requests(lengths: list[int], chunk: int) -> None:
    stream = b"".join(
        request(Command.WRITE, 0, length, cookie=i) + bytes([i + 1]) * length
        for i, length in enumerate(lengths)
    )
    served = feed_like_a_socket(RequestParser(MAX), stream, chunk)
    assert served == [(i, bytes([i + 1]) * length) for i, length in enumerate(lengths)]


def test_small_writes_in_the_scratch_buffer_are_views_not_copies() -> None:
    parser = RequestParser(MAX)
    stream = request(Command.WRITE, 0, 4096, cookie=1) + b"x" * 4096
    target = parser.get_buffer()
    target[: len(stream)] = stream
    [req] = parser.buffer_updated(len(stream))
    assert isinstance(req.payload, memoryview) and req.payload.obj is parser._scratch
    assert bytes(req.payload) == b"x" * 4096


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 3 * DIRECT_THRESHOLD), min_size=1, max_size=8),
    st.integers(1, 300_000),
)
def test_partial_write_reports_a_final_prefix_of_the_arriving_payload(
    lengths: list[int], chunk: int
) -> None:
    payloads = [bytes((i * 7 + k) % 251 for k in range(length)) for i, length in enumerate(lengths)]
    stream = b"".join(
        request(Command.WRITE, 0, len(data), cookie=i) + data for i, data in enumerate(payloads)
    )
    parser = RequestParser(MAX)
    seen: dict[int, int] = {}  # cookie -> bytes reported so far
    done: list[int] = []
    for batch in receive_in_pieces(parser, stream, chunk):
        for req in batch:
            assert req.payload == payloads[req.cookie]
            done.append(req.cookie)
        partial = parser.partial_write()
        assert (partial is None) == (not parser.awaiting_payload)
        if partial is not None:
            req, received = partial
            assert req.cookie not in done
            assert seen.get(req.cookie, 0) <= received < req.length
            assert req.payload is not None
            assert bytes(req.payload[:received]) == payloads[req.cookie][:received]
            seen[req.cookie] = received
    assert done == list(range(len(lengths)))


def test_partial_write_is_none_for_a_payload_being_skipped() -> None:
    parser = RequestParser(MAX)
    assert parser.partial_write() is None
    parser.receive(request(Command.WRITE, 0, MAX + 1) + bytes(1 << 20))
    assert parser.awaiting_payload and parser.partial_write() is None
