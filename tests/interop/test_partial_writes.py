"""Large WRITEs are written while their payload arrives, over a real socket: a client that
sends the payload slowly finds its first part on disk before it has sent the rest, gets one
reply at the end, and a write that touches sector 0 is still checked whole by the guard."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from nbdguard.protocol.constants import Command, NBDError, Option, OptionReply
from tests.guard.samples import QEMU_HEADERS
from tests.interop.conftest import ExportSpec, RunningServer, start_server
from tests.protocol.nbdwire import OPT_REPLY, info_payload, option, request

pytestmark = pytest.mark.interop

SIZE = 16 << 20
LENGTH = 4 << 20
FIRST = 1 << 20  # sent before the client pauses


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(
        tmp_path_factory.mktemp("parts"), [ExportSpec("d", size=SIZE)], metrics=True
    )
    yield server
    assert server.stop() == 0, server.log()


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return data


def open_session(server: RunningServer, export: str) -> socket.socket:
    """Newstyle handshake by hand (simple replies only), ending in transmission."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(server.socket_path))
    recv_exactly(sock, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
    sock.sendall(struct.pack(">I", 3) + option(Option.GO, info_payload(export)))
    while True:
        _, _, kind, length = OPT_REPLY.unpack(recv_exactly(sock, OPT_REPLY.size))
        recv_exactly(sock, length)
        if kind == OptionReply.ACK:
            return sock
        assert kind < 1 << 31, f"GO refused: {kind:#x}"


def simple_reply(sock: socket.socket) -> tuple[int, int]:
    _, error, cookie = struct.unpack(">IIQ", recv_exactly(sock, 16))
    return error, cookie


def no_reply_yet(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(10)


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_first_part_is_on_disk_before_the_client_sends_the_rest(running: RunningServer) -> None:
    image = running.images["d"]
    payload = os.urandom(LENGTH)
    offset = 2 << 20
    with open_session(running, "d") as sock:
        sock.sendall(request(Command.WRITE, offset, LENGTH, cookie=11) + payload[:FIRST])

        def first_part_written() -> bool:
            with open(image, "rb") as handle:
                handle.seek(offset)
                return handle.read(64 * 1024) == payload[: 64 * 1024]

        assert wait_for(first_part_written), "nothing of the payload was written while it arrived"
        assert no_reply_yet(sock)
        sock.sendall(payload[FIRST:] + request(Command.READ, offset + LENGTH - 8, 8, cookie=12))
        assert simple_reply(sock) == (0, 11)
        assert simple_reply(sock) == (0, 12)
        assert recv_exactly(sock, 8) == payload[-8:]
        sock.sendall(request(Command.DISC))
    with open(image, "rb") as handle:
        handle.seek(offset)
        assert handle.read(LENGTH) == payload


def test_slow_header_write_at_sector_0_writes_nothing_and_is_refused(
    running: RunningServer,
) -> None:
    image = running.images["d"]
    before = image.read_bytes()
    payload = QEMU_HEADERS["qcow2"] + os.urandom(LENGTH - 512)
    with open_session(running, "d") as sock:
        sock.sendall(request(Command.WRITE, 0, LENGTH, cookie=21) + payload[:FIRST])
        time.sleep(0.3)  # time enough for the server to write a part, if it wrongly would
        assert image.read_bytes() == before
        sock.sendall(payload[FIRST:])
        assert simple_reply(sock) == (NBDError.EPERM, 21)
        sock.sendall(request(Command.DISC))
    assert image.read_bytes() == before
    blocked = {"export": "d", "format": "qcow2", "command": "write"}
    assert running.sample("nbdguard_header_writes_blocked_total", **blocked) == 1
