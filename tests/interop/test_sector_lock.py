"""A local process that holds a lock on a raw image's first bytes delays only the sector-0
writes that need it: every other request, on every connection, is still served at once, and
a write that waits too long fails with EIO and is counted."""

from __future__ import annotations

import fcntl
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, RunningServer, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("lock"),
        [ExportSpec("a", size=8 << 20), ExportSpec("b", size=8 << 20)],
        metrics=True,
    )
    yield running
    running.stop()


def connect(server: RunningServer, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri(export))
    return h


def hold_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 1, 0))
    return fd


def worst_read_latency(h: nbd.NBD, offset: int, count: int = 20) -> float:
    worst = 0.0
    for _ in range(count):
        started = time.monotonic()
        h.pread(4096, offset)
        worst = max(worst, time.monotonic() - started)
    return worst


def wait_done(h: nbd.NBD, cookie: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if h.aio_command_completed(cookie):
            return True
        h.poll(100)
    return False


def test_held_lock_stalls_nobody_and_the_write_lands_after_release(
    server: RunningServer,
) -> None:
    writer, same_export, other_export = (connect(server, e) for e in ("a", "a", "b"))
    other = hold_lock(server.images["a"])
    try:
        cookie = writer.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"w" * 4096)), 0)
        time.sleep(0.2)
        assert not writer.aio_command_completed(cookie)
        # the writer's own connection, another on its export, another export: all served
        assert worst_read_latency(writer, 1 << 20) < 0.1
        assert worst_read_latency(same_export, 4096) < 0.1
        assert worst_read_latency(other_export, 0) < 0.1
        same_export.pwrite(b"p" * 4096, 8192)  # a write past sector 0 needs no lock
        assert server.images["a"].read_bytes()[:4096] == bytes(4096)
    finally:
        os.close(other)
    assert wait_done(writer, cookie, 3)
    assert server.images["a"].read_bytes()[:4096] == b"w" * 4096
    for h in (writer, same_export, other_export):
        h.shutdown()


def test_write_that_waits_too_long_fails_with_eio_and_is_counted(server: RunningServer) -> None:
    h = connect(server, "b")
    other = hold_lock(server.images["b"])
    try:
        started = time.monotonic()
        with pytest.raises(nbd.Error) as failed:
            h.pwrite(b"x" * 512, 0)
        assert failed.value.errno == "EIO"
        assert 4 < time.monotonic() - started < 10
        assert server.images["b"].read_bytes()[:512] == bytes(512)
    finally:
        os.close(other)
    h.pwrite(b"y" * 512, 0)  # once released, the next write goes through
    assert server.images["b"].read_bytes()[:512] == b"y" * 512
    h.shutdown()
    assert server.sample("nbdguard_sector0_lock_timeouts_total", export="b") == 1
    assert '"guard.sector_lock_timeout"' in server.log()
