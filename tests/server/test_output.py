"""ReplyWriter over real sockets: bytes arrive in order whatever mix of buffers and file
ranges is sent and however full the socket is; TLS-style transports get the bytes; a
range that cannot be read breaks the connection rather than the framing."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from nbdguard.server.output import Piece, ReplyWriter
from nbdguard.storage.device import FileRange

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class Relay(asyncio.Protocol):
    """The connection's part: transport flow control goes to the writer."""

    writer: ReplyWriter | None = None

    def pause_writing(self) -> None:
        assert self.writer is not None
        self.writer.pause()

    def resume_writing(self) -> None:
        assert self.writer is not None
        self.writer.resume()


@pytest.fixture
def image(tmp_path: Path) -> int:
    path = tmp_path / "image"
    path.write_bytes(os.urandom(8 << 20))
    fd = os.open(path, os.O_RDONLY)
    yield fd  # type: ignore[misc]
    os.close(fd)


def expected_bytes(fd: int, pieces: list[Piece]) -> bytes:
    out = bytearray()
    for piece in pieces:
        if isinstance(piece, FileRange):
            fresh = piece.recheck() if piece.recheck is not None else None
            out += fresh if fresh is not None else os.pread(fd, piece.length, piece.offset)
        else:
            out += piece
    return bytes(out)


def stale(length: int, mark: int) -> Callable[[], bytes]:
    """A recheck saying the file no longer holds the device's bytes: these are."""
    fresh = bytes([mark % 256]) * length
    return lambda: fresh


def random_batches(fd: int, seed: int) -> list[list[Piece]]:
    rng = random.Random(seed)
    batches: list[list[Piece]] = []
    for number in range(60):
        batch: list[Piece] = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.5:
                batch.append(number.to_bytes(4, "big") * rng.choice([1, 5, 50, 20_000]))
                continue
            length = rng.choice([1, 4096, 65536, 300_000, 1 << 20])
            offset = rng.randrange(0, (8 << 20) - length)
            kind = rng.choice(["plain", "still valid", "stale"])
            if kind == "plain":
                batch.append(FileRange(fd, offset, length))
            elif kind == "still valid":
                batch.append(FileRange(fd, offset, length, lambda: None))
            else:
                batch.append(FileRange(fd, offset, length, stale(length, number)))
        batches.append(batch)
    return batches


async def send_and_receive(
    fd: int, batches: list[list[Piece]], *, cork: bool
) -> tuple[bytes, list[OSError]]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)  # fills at once
    failures: list[OSError] = []
    transport, relay = await loop.create_unix_connection(Relay, sock=ours)
    writer = ReplyWriter(transport, failures.append)  # type: ignore[arg-type]
    relay.writer = writer
    theirs.setblocking(False)
    received = bytearray()
    total = len(expected_bytes(fd, [p for batch in batches for p in batch]))
    for batch in batches:
        if cork:
            writer.cork()
            writer.send(batch[:1])
            writer.send(batch[1:])
            writer.uncork()
        else:
            writer.send(batch)
        await asyncio.sleep(0)
        if random.random() < 0.3:  # a slow reader: take a little now and then
            with contextlib.suppress(BlockingIOError):
                received += theirs.recv(100_000)
    deadline = loop.time() + 10
    while len(received) < total and not failures and loop.time() < deadline:
        await asyncio.sleep(0.001)
        try:
            while chunk := theirs.recv(1 << 20):
                received += chunk
        except BlockingIOError:
            pass
    writer.close()
    transport.close()
    theirs.close()
    return bytes(received), failures


@pytest.mark.parametrize("loop_name", list(LOOPS))
@pytest.mark.parametrize("cork", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bytes_arrive_in_order(image: int, loop_name: str, cork: bool, seed: int) -> None:
    batches = random_batches(image, seed)
    loop = LOOPS[loop_name]()
    try:
        received, failures = loop.run_until_complete(send_and_receive(image, batches, cork=cork))
    finally:
        loop.close()
    assert not failures
    assert received == expected_bytes(image, [p for batch in batches for p in batch])


class FakeTlsTransport:
    """Stands in for an SSL transport: bytes only, through writelines."""

    def __init__(self) -> None:
        self.written = bytearray()

    def get_extra_info(self, name: str) -> Any:
        return object() if name == "sslcontext" else None

    def is_closing(self) -> bool:
        return False

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            assert isinstance(piece, bytes | bytearray | memoryview)
            self.written += piece


def test_ranges_become_bytes_under_tls(image: int) -> None:
    transport = FakeTlsTransport()
    failures: list[OSError] = []
    writer = ReplyWriter(transport, failures.append)  # type: ignore[arg-type]
    pieces: list[Piece] = [
        b"head",
        FileRange(image, 12345, 70000),
        FileRange(image, 0, 65536, stale(65536, 0xEE)),
        b"tail",
    ]
    writer.send(pieces)
    assert bytes(transport.written) == expected_bytes(image, pieces)
    assert not failures


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_a_range_past_the_end_of_the_file_fails_the_connection(image: int, loop_name: str) -> None:
    async def run() -> tuple[bytes, list[OSError]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        failures: list[OSError] = []
        transport, relay = await loop.create_unix_connection(Relay, sock=ours)
        writer = ReplyWriter(transport, failures.append)  # type: ignore[arg-type]
        relay.writer = writer
        writer.send([b"header", FileRange(image, (8 << 20) - 100, 200), b"never"])
        await asyncio.sleep(0.01)
        theirs.setblocking(False)
        data = theirs.recv(1 << 20)
        writer.close()
        transport.close()
        theirs.close()
        return data, failures

    loop = LOOPS[loop_name]()
    try:
        data, failures = loop.run_until_complete(run())
    finally:
        loop.close()
    assert [err.errno for err in failures] == [errno.EIO]
    assert b"never" not in data  # nothing after the broken reply
