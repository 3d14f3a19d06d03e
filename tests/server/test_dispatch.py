"""Requests framed from raw bytes, served against a real raw image, replies decoded
from the bytes the dispatcher hands to the transport: no sockets."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import structlog

from nbdguard.config import ExportConfig
from nbdguard.observability.metrics import Metrics
from nbdguard.protocol.constants import (
    BASE_ALLOCATION_ID,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    NBDError,
)
from nbdguard.protocol.transmission import RequestParser
from nbdguard.protocol.validate import SessionLimits
from nbdguard.server.dispatch import Dispatcher
from nbdguard.server.exports import open_export
from nbdguard.storage.device import BlockDevice, FileRange, Layer
from tests.guard.samples import QEMU_HEADERS
from tests.protocol.nbdwire import receive_in_pieces, request
from tests.storage.test_qcow2_image import check_and_compare, sh

SIZE = 4 << 20


class Wire:
    """Collects what the dispatcher sends and decodes it as a client would."""

    def __init__(self) -> None:
        self.data = bytearray()

    def send(self, pieces: Any) -> None:
        for piece in pieces:
            if isinstance(piece, FileRange):  # what the reply writer would put on the wire
                fresh = piece.recheck() if piece.recheck is not None else None
                self.data += (
                    fresh if fresh is not None else os.pread(piece.fd, piece.length, piece.offset)
                )
            else:
                self.data += piece

    def simple(self, payload: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack_from(">IIQ", self.data)
        assert magic == SIMPLE_REPLY_MAGIC
        body = bytes(self.data[16 : 16 + payload])
        del self.data[: 16 + payload]
        return error, cookie, body

    def chunks(self) -> list[tuple[int, int, int, bytes]]:
        """(flags, type, cookie, body) for every structured chunk."""
        out = []
        while self.data:
            magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", self.data)
            assert magic == STRUCTURED_REPLY_MAGIC
            out.append((flags, kind, cookie, bytes(self.data[20 : 20 + length])))
            del self.data[: 20 + length]
        return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "d.raw"
    with open(path, "wb") as handle:
        handle.truncate(SIZE)
        handle.seek(1 << 20)
        handle.write(b"\xab" * 65536)
    return path


def make(image: Path, *, structured: bool, read_only: bool = False) -> tuple[Any, Wire, Any]:
    config = ExportConfig(name="d", path=image, format="raw", read_only=read_only)
    export = open_export(config, Metrics().for_export("d"))
    limits = SessionLimits(SIZE, read_only, structured, structured, 32 << 20)
    wire = Wire()
    contexts = (BASE_ALLOCATION_ID,) if structured else ()
    dispatcher = Dispatcher(export, limits, contexts, wire.send, structlog.get_logger())
    return dispatcher, wire, export


def serve(dispatcher: Dispatcher, data: bytes) -> None:
    for event in RequestParser().receive(data):
        dispatcher.receive(event)


def test_simple_read_reply_carries_the_data(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    serve(dispatcher, request(Command.READ, (1 << 20) - 4, 8, cookie=77))
    assert wire.simple(8) == (0, 77, bytes(4) + b"\xab" * 4)
    export.close()


def test_simple_write_then_read(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    serve(dispatcher, request(Command.WRITE, 100, 5, cookie=1) + b"hello")
    serve(dispatcher, request(Command.READ, 100, 5, cookie=2))
    assert wire.simple() == (0, 1, b"")
    assert wire.simple(5) == (0, 2, b"hello")
    assert image.read_bytes()[100:105] == b"hello"
    export.close()


def test_structured_sparse_read_sends_holes(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=True)
    serve(dispatcher, request(Command.READ, (1 << 20) - 65536, 3 * 65536, cookie=5))
    chunks = wire.chunks()
    kinds = [kind for _, kind, _, _ in chunks]
    assert ChunkType.OFFSET_HOLE in kinds and ChunkType.OFFSET_DATA in kinds
    assert [flags for flags, *_ in chunks][-1] == 1 and all(f == 0 for f, *_ in chunks[:-1])
    covered = 0
    for _, kind, cookie, body in chunks:
        assert cookie == 5
        if kind == ChunkType.OFFSET_HOLE:
            covered += struct.unpack(">QI", body)[1]
        else:
            assert body[8:] == b"\xab" * (len(body) - 8)
            covered += len(body) - 8
    assert covered == 3 * 65536
    export.close()


def test_structured_read_with_df_is_one_chunk(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=True)
    serve(dispatcher, request(Command.READ, (1 << 20) - 65536, 3 * 65536, flags=CommandFlag.DF))
    [(flags, kind, _, body)] = wire.chunks()
    assert (flags, kind, len(body)) == (1, ChunkType.OFFSET_DATA, 8 + 3 * 65536)
    serve(dispatcher, request(Command.READ, 2 << 20, 1 << 20, flags=CommandFlag.DF))
    [(flags, kind, _, body)] = wire.chunks()
    assert (flags, kind, struct.unpack(">QI", body)) == (
        1,
        ChunkType.OFFSET_HOLE,
        (2 << 20, 1 << 20),
    )
    export.close()


def test_structured_errors_are_error_chunks(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=True)
    serve(dispatcher, request(Command.READ, SIZE, 512, cookie=9))
    [(flags, kind, cookie, body)] = wire.chunks()
    assert (flags, kind, cookie) == (1, ChunkType.ERROR, 9)
    assert struct.unpack_from(">I", body)[0] == NBDError.EINVAL
    serve(dispatcher, request(Command.WRITE, SIZE, 4, cookie=10) + b"abcd")
    assert wire.simple() == (NBDError.ENOSPC, 10, b"")
    export.close()


def test_block_status_reply(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=True)
    serve(dispatcher, request(Command.BLOCK_STATUS, 0, SIZE, cookie=3))
    [(flags, kind, cookie, body)] = wire.chunks()
    assert (flags, kind, cookie) == (1, ChunkType.BLOCK_STATUS, 3)
    context, *words = struct.unpack(f">I{(len(body) - 4) // 4}I", body)
    extents = list(zip(words[::2], words[1::2], strict=True))
    assert context == BASE_ALLOCATION_ID
    assert extents[0] == (1 << 20, 3) and extents[1][1] == 0
    assert sum(length for length, _ in extents) == SIZE
    serve(dispatcher, request(Command.BLOCK_STATUS, 0, SIZE, flags=CommandFlag.REQ_ONE))
    [(_, _, _, body)] = wire.chunks()
    assert len(body) == 4 + 8
    export.close()


def test_read_only_and_unknown_commands(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False, read_only=True)
    serve(dispatcher, request(Command.WRITE, 0, 3, cookie=1) + b"xyz")
    serve(dispatcher, request(Command.TRIM, 0, 512, cookie=2))
    serve(dispatcher, request(Command.WRITE_ZEROES, 0, 512, cookie=3))
    serve(dispatcher, request(42, 0, 0, cookie=4))
    serve(dispatcher, request(Command.CACHE, 0, 4096, cookie=5))
    assert [wire.simple()[:2] for _ in range(5)] == [
        (NBDError.EPERM, 1),
        (NBDError.EPERM, 2),
        (NBDError.EPERM, 3),
        (NBDError.EINVAL, 4),
        (0, 5),
    ]
    export.close()


def test_guarded_header_write_is_eperm_and_counted(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    header = QEMU_HEADERS["qed"]
    serve(dispatcher, request(Command.WRITE, 0, 512, cookie=8) + header)
    assert wire.simple() == (NBDError.EPERM, 8, b"")
    assert image.read_bytes()[:512] == bytes(512)
    blocked = export.metrics.metrics.header_writes_blocked
    assert blocked.labels(export="d", format="qed", command="write")._value.get() == 1
    export.close()


async def test_flush_and_fua_reply_after_the_sync(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    serve(dispatcher, request(Command.FLUSH, cookie=1))
    serve(dispatcher, request(Command.WRITE, 0, 2, flags=CommandFlag.FUA, cookie=2) + b"ok")
    assert not wire.data  # both wait for fdatasync in a worker thread
    await dispatcher.drain()
    replies = sorted(wire.simple()[:2] for _ in range(2))
    assert replies == [(0, 1), (0, 2)]
    dispatcher.shutting_down = True
    serve(dispatcher, request(Command.READ, 0, 512, cookie=3))
    assert wire.simple() == (NBDError.ESHUTDOWN, 3, b"")
    await asyncio.sleep(0)
    export.close()


class Arrivals:
    """Feeds a stream one receive at a time, as the connection does: each receive's events
    (headers and payload pieces) go to the dispatcher in order."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.parser = RequestParser()

    def receive(self, data: bytes) -> None:
        for batch in receive_in_pieces(self.parser, data):
            for event in batch:
                self.dispatcher.receive(event)


PART = 1 << 20  # payload of the large writes below


def test_large_write_is_written_while_its_payload_arrives(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    before = image.read_bytes()
    payload = os.urandom(PART)
    offset = (1 << 20) + 512  # not page aligned: raw parts end where the pieces end
    arrivals = Arrivals(dispatcher)
    arrivals.receive(request(Command.WRITE, offset, PART, cookie=5) + payload[:300_000])
    now = image.read_bytes()
    assert not wire.data  # no reply before the whole payload is here
    written = next(
        i for i in range(300_000, -1, -1) if i == 0 or now[offset + i - 1] != before[offset + i - 1]
    )
    assert written >= 128 * 1024
    assert now[offset : offset + written] == payload[:written]
    assert now[offset + written :] == before[offset + written :]
    arrivals.receive(payload[300_000:])
    assert wire.simple() == (0, 5, b"")
    assert image.read_bytes()[offset : offset + PART] == payload
    assert export.metrics.written_bytes == PART  # counted once, as one request
    export.close()


def test_a_write_abandoned_mid_payload_leaves_nothing_in_flight(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    arrivals = Arrivals(dispatcher)
    arrivals.receive(request(Command.WRITE, 1 << 20, PART, cookie=9) + os.urandom(PART // 2))
    assert image.read_bytes()[1 << 20 : (1 << 20) + 4096] != bytes(4096)  # begun
    assert export.metrics.in_flight == 0  # the client may leave here, never to finish it
    assert not wire.data
    export.close()


async def test_write_to_sector_0_waits_until_whole_and_a_header_writes_nothing(
    image: Path,
) -> None:
    """Gathered whole, then written in a worker thread (it is long): awaited here."""
    dispatcher, wire, export = make(image, structured=False)
    before = image.read_bytes()
    arrivals = Arrivals(dispatcher)
    header = QEMU_HEADERS["qcow2"] + os.urandom(PART - 512)
    arrivals.receive(request(Command.WRITE, 0, PART, cookie=1))
    for start in range(0, PART - 65536, 65536):
        arrivals.receive(header[start : start + 65536])
        assert image.read_bytes() == before  # the guard must see the request whole
    arrivals.receive(header[PART - 65536 :])
    await dispatcher.drain()
    assert wire.simple() == (NBDError.EPERM, 1, b"")
    assert image.read_bytes() == before

    plain = os.urandom(PART)
    arrivals.receive(request(Command.WRITE, 0, PART, cookie=2) + plain[:-1])
    assert image.read_bytes() == before
    arrivals.receive(plain[-1:])
    await dispatcher.drain()
    assert wire.simple() == (0, 2, b"")
    assert image.read_bytes()[:PART] == plain
    export.close()


def test_invalid_write_is_not_written_in_parts(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False, read_only=True)
    before = image.read_bytes()
    arrivals = Arrivals(dispatcher)
    arrivals.receive(request(Command.WRITE, 1 << 20, PART, cookie=3) + os.urandom(PART - 1))
    assert image.read_bytes() == before
    arrivals.receive(b"x")
    assert wire.simple() == (NBDError.EPERM, 3, b"")
    assert image.read_bytes() == before
    export.close()


class FailsOnSecondWrite(Layer):
    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.calls = 0

    def pwrite(self, data: Any, offset: int) -> None:
        self.calls += 1
        if self.calls == 2:
            raise OSError(errno.ENOSPC, "no space left")
        self.inner.pwrite(data, offset)


def test_a_failed_part_fails_the_write_writes_no_more_and_keeps_framing(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    device = dispatcher.device = FailsOnSecondWrite(dispatcher.device)
    before = image.read_bytes()
    payload = os.urandom(PART)
    offset = 1 << 20
    arrivals = Arrivals(dispatcher)
    arrivals.receive(request(Command.WRITE, offset, PART, cookie=4))
    for start in range(0, PART, 128 * 1024):
        arrivals.receive(payload[start : start + 128 * 1024])
    assert device.calls == 2  # one part written, the second failed, nothing after it
    assert wire.simple() == (NBDError.ENOSPC, 4, b"")
    after = image.read_bytes()
    assert after[offset : offset + 128 * 1024] == payload[: 128 * 1024]
    assert after[offset + 256 * 1024 :] == before[offset + 256 * 1024 :]
    arrivals.receive(request(Command.READ, offset, 4, cookie=6))
    assert wire.simple(4) == (0, 6, payload[:4])  # the stream is still framed
    export.close()


def test_shutdown_mid_payload_finishes_the_begun_write(image: Path) -> None:
    dispatcher, wire, export = make(image, structured=False)
    payload = os.urandom(PART)
    arrivals = Arrivals(dispatcher)
    arrivals.receive(request(Command.WRITE, 1 << 20, PART, cookie=7) + payload[: PART // 2])
    dispatcher.shutting_down = True
    arrivals.receive(payload[PART // 2 :] + request(Command.READ, 0, 512, cookie=8))
    assert wire.simple() == (0, 7, b"")
    assert wire.simple() == (NBDError.ESHUTDOWN, 8, b"")
    assert image.read_bytes()[1 << 20 : (1 << 20) + PART] == payload
    export.close()


class Recording(Layer):
    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.writes: list[tuple[int, int]] = []

    def pwrite(self, data: Any, offset: int) -> None:
        self.writes.append((offset, len(data)))
        self.inner.pwrite(data, offset)


@pytest.mark.parametrize("cluster", [4096, 65536, 2 << 20])
def test_qcow2_write_in_parts_ends_parts_on_clusters_and_matches_qemu(
    tmp_path: Path, cluster: int
) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    sh(
        f"qemu-img create -q -f raw {base} 8M",
        f"qemu-io -f raw -c 'write -P 0x11 0 8M' {base}",
        f"cd {tmp_path} && qemu-img create -q -f qcow2 -o cluster_size={cluster} "
        "-b base.raw -F raw top.qcow2 8M",
    )
    export = open_export(
        ExportConfig(name="q", path=top, format="qcow2"), Metrics().for_export("q")
    )
    wire = Wire()
    limits = SessionLimits(8 << 20, False, False, False, 32 << 20)
    dispatcher = Dispatcher(export, limits, (), wire.send, structlog.get_logger())
    device = dispatcher.device = Recording(dispatcher.device)
    payload = os.urandom(3 << 20)
    offset = (1 << 20) + 4196  # neither end on a cluster boundary
    stream = request(Command.WRITE, offset, len(payload), cookie=1) + payload
    arrivals = Arrivals(dispatcher)
    for start in range(0, len(stream), 200_000):
        arrivals.receive(stream[start : start + 200_000])
    assert wire.simple() == (0, 1, b"")
    assert len(device.writes) > 1
    assert all((start + length) % cluster == 0 for start, length in device.writes[:-1])
    assert sum(length for _, length in device.writes) == len(payload)
    export.close()
    model = bytearray(b"\x11" * (8 << 20))
    model[offset : offset + len(payload)] = payload
    check_and_compare(top, bytes(model))
