"""One client cannot lock the others out: per-client limits and idle eviction, live."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from nbdguard.protocol.constants import Command, Option, OptionReply
from tests.interop.conftest import ExportSpec, RunningServer, require, start_server
from tests.interop.hostile_client import recv_exactly
from tests.interop.test_tls import (
    CLIENT_EXT,
    SERVER_EXT,
    client_dir,
    make_ca,
    make_cert,
    tls_uri,
)
from tests.protocol.nbdwire import OPT_REPLY, info_payload, option, request

pytestmark = pytest.mark.interop

PATTERN = bytes(range(256)) * 16  # 4 KiB at the start of the export
SIMPLE_REPLY = struct.Struct(">IIQ")


def session(target: str | int, export: str = "vm1", source: str = "127.0.0.1") -> socket.socket:
    """A real NBD handshake (fixed newstyle, GO, simple replies) over TCP from `source` (a
    port) or over a Unix socket (a path), ending in transmission."""
    if isinstance(target, int):
        sock = socket.create_connection(
            ("127.0.0.1", target), timeout=10, source_address=(source, 0)
        )
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(target)
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3) + option(Option.GO, info_payload(export)))
    while True:
        _, _, kind, length = OPT_REPLY.unpack(recv_exactly(sock, OPT_REPLY.size))
        recv_exactly(sock, length)
        assert kind < 1 << 31, f"option refused: {kind:#x}"
        if kind == OptionReply.ACK:
            return sock


def read(sock: socket.socket, offset: int, length: int, cookie: int = 1) -> bytes:
    sock.sendall(request(Command.READ, offset, length, cookie=cookie))
    return read_reply(sock, length, cookie)


def read_reply(sock: socket.socket, length: int, cookie: int) -> bytes:
    _, error, got = SIMPLE_REPLY.unpack(recv_exactly(sock, SIMPLE_REPLY.size))
    assert (error, got) == (0, cookie)
    return recv_exactly(sock, length) if length else b""


def refused(target: str | int, source: str = "127.0.0.1") -> bool:
    """Whether a new connection is closed before the server greets it."""
    if isinstance(target, int):
        sock = socket.create_connection(
            ("127.0.0.1", target), timeout=10, source_address=(source, 0)
        )
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(target)
    with sock:
        try:
            return sock.recv(18) == b""
        except ConnectionResetError:  # refused with abort(): a reset, not a FIN
            return True


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def events(server: RunningServer, name: str) -> list[dict[str, object]]:
    found = []
    for line in server.log().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def start(tmp_path: Path, **server: object) -> RunningServer:
    spec = ExportSpec("vm1", size=64 << 20, fill=PATTERN)
    return start_server(tmp_path / "s", [spec], metrics=True, **server)


def test_client_over_its_limit_is_refused_and_another_address_is_served(tmp_path: Path) -> None:
    server = start(tmp_path, max_connections_per_client=4)
    held = [session(server.port) for _ in range(4)]  # idle ones count too
    assert refused(server.port)
    other = session(server.port, source="127.0.0.2")
    assert read(other, 0, 4096) == PATTERN
    assert read(held[0], 4096, 512) == bytes(512)  # the client keeps what it holds
    assert server.sample("nbdguard_limit_hits_total", limit="max_connections_per_client") == 1
    (event,) = events(server, "connection.refused")
    assert event["limit"] == "max_connections_per_client"
    assert event["client_key"] == "tcp 127.0.0.1"
    gone = held.pop()
    gone.sendall(request(Command.DISC))  # one slot given back...
    assert closed_by_server(gone)
    again = session(server.port)  # ...is the client's again
    assert read(again, 0, 16) == PATTERN[:16]
    for sock in [*held, gone, other, again]:
        sock.close()
    assert server.stop() == 0


def test_unix_clients_are_counted_by_uid(tmp_path: Path) -> None:
    server = start(tmp_path, max_connections_per_client=4)
    path = str(server.socket_path)
    held = [session(path) for _ in range(4)]
    assert refused(path)
    tcp = session(server.port)  # the same user over TCP is another client
    assert read(tcp, 0, 16) == PATTERN[:16]
    (event,) = events(server, "connection.refused")
    assert str(event["client_key"]).startswith("uid ")
    for sock in [*held, tcp]:
        sock.close()
    assert server.stop() == 0


def stall_write(sock: socket.socket) -> None:
    """A WRITE whose payload has only begun to arrive: a request in flight."""
    sock.sendall(request(Command.WRITE, 48 << 20, 65536, cookie=7) + b"\1" * 100)


def test_full_server_evicts_idle_connections_never_busy_ones(tmp_path: Path) -> None:
    server = start(tmp_path, max_connections=4, evict_idle_after=0.5)
    reader = session(server.port)  # 128 MiB of replies it does not read: in flight
    reader.sendall(b"".join(request(Command.READ, i << 20, 4 << 20, cookie=i) for i in range(32)))
    writer = session(server.port)
    stall_write(writer)
    oldest = session(server.port)
    time.sleep(0.3)  # `oldest` has been idle longer than `younger`
    younger = session(server.port)
    time.sleep(0.6)  # both are now past evict_idle_after
    newcomer = session(server.port, source="127.0.0.2")
    assert read(newcomer, 0, 4096) == PATTERN
    assert closed_by_server(oldest)
    assert read(younger, 0, 16) == PATTERN[:16]  # still served; idle again from now
    stall_write(newcomer)
    time.sleep(0.6)
    second = session(server.port, source="127.0.0.2")
    assert closed_by_server(younger)
    stall_write(second)
    assert refused(server.port, source="127.0.0.3")  # all four busy: nobody to evict
    for sock in (writer, newcomer, second):  # the stalled writes complete
        sock.sendall(b"\1" * (65536 - 100))
        assert read_reply(sock, 0, cookie=7) == b""
    image = PATTERN + bytes(36 << 20)
    for i in range(32):  # every reply the reader left waiting arrives, intact
        assert read_reply(reader, 4 << 20, cookie=i) == image[i << 20 : (i + 4) << 20]
    assert server.sample("nbdguard_limit_hits_total", limit="evicted_idle") == 2
    assert server.sample("nbdguard_limit_hits_total", limit="max_connections") == 1
    assert len(events(server, "connection.evicted")) == 2
    for sock in (reader, writer, oldest, younger, newcomer, second):
        sock.close()
    assert server.stop() == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openssl")
    pki = tmp_path_factory.mktemp("pki")
    make_ca(pki, "ca")
    make_cert(pki, "server", "/CN=localhost", SERVER_EXT)
    make_cert(pki, "web01", "/O=Example/CN=web01", CLIENT_EXT)
    make_cert(pki, "db02", "/O=Example/CN=db02", CLIENT_EXT)
    return pki


def test_tls_clients_are_counted_by_certificate_subject(tmp_path: Path, pki: Path) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    tls = {
        "mode": "require",
        "cert": str(pki / "server-cert.pem"),
        "key": str(pki / "server-key.pem"),
        "ca": str(pki / "ca-cert.pem"),
    }
    server = start(tmp_path, max_connections_per_client=2, tls=tls)

    def connect(name: str) -> Any:
        handle = nbd.NBD()
        handle.set_uri_allow_local_file(True)
        handle.connect_uri(tls_uri(server, "vm1", client_dir(pki, name), "tcp"))
        return handle

    web = [connect("web01"), connect("web01")]  # all from 127.0.0.1
    with pytest.raises(nbd.Error):
        connect("web01")  # refused once its certificate shows who it is
    db = [connect("db02"), connect("db02")]  # same address, another subject: served
    assert db[1].pread(16, 0) == PATTERN[:16]
    assert web[0].pread(16, 0) == PATTERN[:16]
    (event,) = events(server, "connection.refused")
    assert event["limit"] == "max_connections_per_client"
    assert event["client_key"] == "cert CN=web01,O=Example"  # RFC 4514
    assert server.sample("nbdguard_limit_hits_total", limit="max_connections_per_client") == 1
    for handle in web + db:
        handle.shutdown()
    assert server.stop() == 0
