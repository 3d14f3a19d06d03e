"""A live server fed hostile byte streams: random, truncated, oversized, out-of-order and
valid-then-corrupted sessions. After every stream the server must have closed the
connection once we stopped sending (no hang), a fresh connection must still be greeted,
and at the end the read-only image is unchanged, sector 0 of the guarded image holds no
header, and the server never logged an unhandled exception. A bounded number of examples
runs in CI; `--runslow` runs many more."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdguard.guard.signatures import detect_header
from tests.interop.conftest import ExportSpec, RunningServer, start_server
from tests.protocol.nbdwire import info_payload, meta_payload, option, request

pytestmark = pytest.mark.interop

CI_EXAMPLES = 1500
SLOW_EXAMPLES = 50_000
CLIENT_FLAGS = struct.pack(">I", 3)  # fixed newstyle + no zeroes
QCOW2_SECTOR = b"QFI\xfb" + struct.pack(">I", 3) + bytes(504)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("fuzz")
    exports = [
        ExportSpec("ro", size=1 << 20, read_only=True, fill=os.urandom(65536)),
        ExportSpec("rw", size=1 << 20),
    ]
    server = start_server(directory, exports, handshake_timeout=5, max_connections=1000)
    server.ro_digest = hashlib.sha256(server.images["ro"].read_bytes()).hexdigest()  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0


commands = st.integers(0, 12)
offsets = st.sampled_from([0, 1, 511, 512, 4096, (1 << 20) - 1, 1 << 20, 2**63, 2**64 - 1])
lengths = st.sampled_from([0, 1, 511, 512, 4096, 65536, 32 << 20, (32 << 20) + 1, 2**32 - 1])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    command = draw(commands)
    length = draw(lengths)
    header = request(
        command,
        draw(offsets),
        length,
        flags=draw(st.integers(0, 0xFFFF)),
        cookie=draw(st.integers(0, 2**64 - 1)),
    )
    if command == 1:  # WRITE: a payload that may be the whole, part, or header-shaped
        payload = draw(st.sampled_from([QCOW2_SECTOR, b"\x00" * 512, b"\xff" * 17, b""]))
        header += payload[: min(length, len(payload))]
    return header


@st.composite
def options(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(["ro", "rw", "", "missing", "x" * 5000]))
    code = draw(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 99]))
    payloads = {
        1: name.encode(),
        6: info_payload(name),
        7: info_payload(name),
        9: meta_payload(name, "base:allocation", "qemu:allocation-depth"),
        10: meta_payload(name, "base:allocation"),
    }
    payload = draw(st.one_of(st.just(payloads.get(code, b"")), st.binary(max_size=64)))
    return option(code, payload)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    """A plausible session: flags, options, GO to an export, requests."""
    stream = CLIENT_FLAGS + b"".join(draw(st.lists(options(), max_size=4)))
    stream += option(8) + option(7, info_payload(draw(st.sampled_from(["ro", "rw"]))))
    return stream + b"".join(draw(st.lists(requests(), max_size=8)))


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(sessions()))
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut if draw(st.booleans()) else len(data)])


streams = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=256).map(lambda tail: CLIENT_FLAGS + tail),
    sessions(),
    corrupted(),
)


def exchange(server: RunningServer, data: bytes) -> None:
    """Send a stream, stop sending, and require the server to close within a bound."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(str(server.socket_path))
        greeting = b""
        while len(greeting) < 18:
            chunk = client.recv(18 - len(greeting))
            assert chunk, "no greeting"
            greeting += chunk
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server already hung up on us: a clean outcome
        deadline = time.monotonic() + 10
        while True:
            try:
                chunk = client.recv(1 << 20)
            except ConnectionResetError:
                return
            if not chunk:
                return
            assert time.monotonic() < deadline, "server kept the connection open after EOF"


def check_invariants(server: RunningServer) -> None:
    assert server.process.poll() is None, server.log()
    digest = hashlib.sha256(server.images["ro"].read_bytes()).hexdigest()
    assert digest == server.ro_digest, "the read-only export changed"  # type: ignore[attr-defined]
    with open(server.images["rw"], "rb") as image:
        sector = image.read(512)
    assert detect_header(sector, "qemu") is None
    log = server.log()
    assert "Traceback" not in log and "Exception in" not in log, log[-4000:]


def test_hostile_streams(fuzz_server: RunningServer, runslow: bool) -> None:
    @settings(
        max_examples=SLOW_EXAMPLES if runslow else CI_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(data=streams)
    def run(data: bytes) -> None:
        exchange(fuzz_server, data)

    run()
    exchange(fuzz_server, CLIENT_FLAGS + option(2))  # still answering
    check_invariants(fuzz_server)


def test_other_clients_are_served_while_fuzzing(fuzz_server: RunningServer) -> None:
    nbd = pytest.importorskip("nbd")
    handle = nbd.NBD()
    handle.connect_uri(fuzz_server.uri("ro"))
    expected = fuzz_server.images["ro"].read_bytes()[:4096]
    for seed in range(200):
        exchange(fuzz_server, os.urandom(64 + seed))
        assert handle.pread(4096, 0) == expected
    handle.shutdown()
    check_invariants(fuzz_server)
