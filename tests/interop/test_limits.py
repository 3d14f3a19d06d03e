"""Configured limits: each is hit, reported, and leaves other clients unaffected."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, require, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop


def test_max_connections(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "s",
        [ExportSpec("vm1", size=1 << 20)],
        max_connections=2,
        metrics=True,
    )
    first, second = nbd.NBD(), nbd.NBD()
    first.connect_uri(server.uri("vm1"))
    second.connect_uri(server.uri("vm1"))
    third = nbd.NBD()
    with pytest.raises(nbd.Error):
        third.connect_uri(server.uri("vm1"))
    first.pwrite(b"still", 0)
    assert second.pread(5, 0) == b"still"
    assert server.sample("nbdguard_limit_hits_total", limit="max_connections") == 1
    first.shutdown()
    time.sleep(0.2)
    again = nbd.NBD()
    again.connect_uri(server.uri("vm1"))  # a slot is free again
    again.shutdown()
    second.shutdown()
    assert server.stop() == 0
    assert '"connection.refused"' in server.log()


def test_handshake_timeout(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "s",
        [ExportSpec("vm1", size=1 << 20)],
        handshake_timeout=0.5,
        metrics=True,
    )
    baseline = server.sample("nbdguard_handshake_failures_total", reason="timeout") or 0
    with socket.socket(socket.AF_UNIX) as idle:
        idle.connect(str(server.socket_path))
        idle.settimeout(5)
        started = time.monotonic()
        assert len(idle.recv(18)) == 18  # the greeting, then nothing from us
        assert idle.recv(100) == b""  # the server hung up
        assert time.monotonic() - started < 3
    h = nbd.NBD()
    h.connect_uri(server.uri("vm1"))  # a prompt client is unaffected
    h.shutdown()
    assert (
        server.sample("nbdguard_handshake_failures_total", reason="timeout") or 0
    ) == baseline + 1
    assert server.stop() == 0


def test_max_requests_in_flight_pauses_reading_and_loses_nothing(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "s",
        [ExportSpec("vm1", size=4 << 20)],
        max_requests_in_flight=4,
        metrics=True,
    )
    h = nbd.NBD()
    h.connect_uri(server.uri("vm1"))
    cookies = []
    for i in range(300):  # flushes run in threads: they pile up unless the server pushes back
        cookies.append(h.aio_flush())
        buf = nbd.Buffer.from_bytearray(bytearray([i % 251 + 1]) * 4096)
        cookies.append(h.aio_pwrite(buf, (i % 1024) * 4096, flags=nbd.CMD_FLAG_FUA))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    data = server.images["vm1"].read_bytes()
    for i in range(300):
        assert data[i * 4096 : i * 4096 + 4096] == bytes([i % 251 + 1]) * 4096
    h.shutdown()
    assert (server.sample("nbdguard_limit_hits_total", limit="max_requests_in_flight") or 0) >= 1
    assert server.stop() == 0


def test_per_export_max_connections(tmp_path: Path) -> None:
    exports = [ExportSpec("small", size=1 << 20, extra={"max_connections": 1}), ExportSpec("big")]
    server = start_server(tmp_path / "s", exports, metrics=True)
    holder = nbd.NBD()
    holder.connect_uri(server.uri("small"))
    refused = nbd.NBD()
    with pytest.raises(nbd.Error, match="policy"):
        refused.connect_uri(server.uri("small"))  # GO answered with ERR_POLICY
    other = nbd.NBD()
    other.connect_uri(server.uri("big"))  # other exports are unaffected
    other.shutdown()
    assert server.sample("nbdguard_limit_hits_total", limit="export_max_connections") == 1
    holder.shutdown()
    time.sleep(0.2)
    again = nbd.NBD()
    again.connect_uri(server.uri("small"))
    again.shutdown()
    assert server.stop() == 0
    assert '"limit": "export_max_connections"' in server.log()


def test_idle_timeout_closes_only_idle_connections(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "s", [ExportSpec("vm1", size=1 << 20)], idle_timeout=0.6, metrics=True
    )
    idle, busy = nbd.NBD(), nbd.NBD()
    idle.connect_uri(server.uri("vm1"))
    busy.connect_uri(server.uri("vm1"))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        busy.pread(512, 0)  # keeps asking: never idle
        time.sleep(0.1)
    with pytest.raises(nbd.Error):
        idle.pread(512, 0)
    assert busy.pread(512, 0) == bytes(512)
    assert server.sample("nbdguard_limit_hits_total", limit="idle_timeout") == 1
    busy.shutdown()
    assert server.stop() == 0
    assert '"connection.idle_timeout"' in server.log()


def test_option_limits_are_configurable(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "s", [ExportSpec("vm1", size=1 << 20)], max_options=3, metrics=True
    )
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(server.socket_path))
        client.settimeout(5)
        assert len(client.recv(18)) == 18
        client.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        list_option = struct.pack(">QII", 0x49484156454F5054, 3, 0)  # NBD_OPT_LIST
        client.sendall(list_option * 4)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    assert received.count(struct.pack(">Q", 0x3E889045565A9)) >= 3  # three answered
    assert (
        server.sample("nbdguard_handshake_failures_total", reason="too_many_options") == 1
    )  # the fourth closed it
    assert server.stop() == 0


def test_slow_loris_clients_are_cut_off_and_others_served(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "s",
        [ExportSpec("vm1", size=1 << 20)],
        handshake_timeout=1,
        metrics=True,
        max_connections_per_client=1000,  # one uid: the per-client limit is tested elsewhere
    )
    session = struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 4) + b"\0\0\0\0"
    slow = []
    for _ in range(30):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(server.socket_path))
        sock.settimeout(5)
        slow.append(sock)
    started = time.monotonic()
    handle = nbd.NBD()
    handle.connect_uri(server.uri("vm1"))
    position = 0
    while time.monotonic() - started < 2.5 and position < len(session):
        for sock in slow:  # one byte each, round after round: never a whole option
            with contextlib.suppress(OSError):
                sock.send(session[position : position + 1])
        position += 1
        assert handle.pread(512, 0) == bytes(512)  # the prompt client is served throughout
        time.sleep(0.2)
    for sock in slow:
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                data += chunk
        sock.close()
    assert time.monotonic() - started < 6
    timeouts = server.sample("nbdguard_handshake_failures_total", reason="timeout")
    assert timeouts is not None and timeouts >= 30
    handle.shutdown()
    assert server.stop() == 0


def test_connection_flood_is_refused_beyond_the_limit(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "s",
        [ExportSpec("vm1", size=1 << 20)],
        max_connections=50,
        metrics=True,
        max_connections_per_client=1000,  # one address: the per-client limit is tested elsewhere
    )
    flood = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        flood.append(sock)
    greeted = 0
    for sock in flood:
        with contextlib.suppress(OSError):
            if len(sock.recv(18)) == 18:
                greeted += 1
    assert 1 <= greeted <= 50
    hits = server.sample("nbdguard_limit_hits_total", limit="max_connections")
    assert hits is not None and hits >= 250
    for sock in flood:
        sock.close()
    deadline = time.monotonic() + 5
    handle = nbd.NBD()
    while True:  # once the flood is gone, service resumes
        try:
            handle.connect_uri(server.uri("vm1", "tcp"))
            break
        except nbd.Error:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            handle = nbd.NBD()
    assert handle.pread(512, 0) == bytes(512)
    handle.shutdown()
    assert server.stop() == 0


def _server_send_buffers(pid: int, socket_path: Path) -> list[int]:
    """SO_SNDBUF (as `ss` reports it: twice what was asked) of the server's accepted sockets."""
    lines = subprocess.run(
        ["ss", "-xmpH", "state", "established"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    mine = [line for line in lines if str(socket_path) in line and f"pid={pid}," in line]
    return [int(re.search(r"\btb(\d+)", line).group(1)) for line in mine]  # type: ignore[union-attr]


@pytest.mark.parametrize("asked", [1 << 20, 0])
def test_send_buffer_is_applied_to_client_sockets(tmp_path: Path, asked: int) -> None:
    require("ss")
    server = start_server(tmp_path / "s", [ExportSpec("vm1", size=1 << 20)], send_buffer=asked)
    client = nbd.NBD()
    client.connect_uri(server.uri("vm1"))
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    wmem_default = int(Path("/proc/sys/net/core/wmem_default").read_text())
    expected = 2 * min(asked, wmem_max) if asked else wmem_default
    assert _server_send_buffers(server.process.pid, server.socket_path) == [expected]
    assert client.pread(4096, 0) == bytes(4096)
    client.shutdown()
    assert server.stop() == 0
