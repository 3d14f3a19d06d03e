"""A local process holding a lock on the image's first bytes never stalls the event loop:
the guard refuses to wait on the loop (WouldBlock), and its retry waits a bounded time."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdguard.guard.sector0 import GuardPolicy, HeaderWriteBlocked, Sector0Guard
from nbdguard.storage.device import WouldBlock
from nbdguard.storage.locks import SectorLock
from nbdguard.storage.pinned import open_pinned
from nbdguard.storage.raw import RawImage
from tests.guard.samples import QEMU_HEADERS

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def hold_lock(path: Path, kind: int = fcntl.F_RDLCK) -> int:
    """What another process does: an OFD lock on byte 0 (its own open file description)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 1, 0))
    return fd


class Setup:
    def __init__(self, path: Path, wait: float) -> None:
        path.write_bytes(bytes(1 << 20))
        self.path = path
        opened = open_pinned(path, read_only=False, export="t")
        self.timeouts = 0
        self.device = Sector0Guard(
            RawImage(opened),
            GuardPolicy("qemu"),
            file_lock=SectorLock(opened.fd, wait=wait),
            on_lock_timeout=self._timed_out,
        )

    def _timed_out(self) -> None:
        self.timeouts += 1


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    made = Setup(tmp_path / "l.raw", wait=2.0)
    yield made
    made.device.close()


@pytest.mark.parametrize("kind", [fcntl.F_RDLCK, fcntl.F_WRLCK])
def test_held_lock_raises_would_block_and_writes_nothing(setup: Setup, kind: int) -> None:
    other = hold_lock(setup.path, kind)
    try:
        started = time.monotonic()
        with pytest.raises(WouldBlock):
            setup.device.pwrite(b"x" * 4096, 0)
        with pytest.raises(WouldBlock):
            setup.device.write_zeroes(0, 4096, may_trim=False, fast=False)
        with pytest.raises(WouldBlock):
            setup.device.trim(100, 8192)
        assert time.monotonic() - started < 0.05  # tried, never waited
        assert setup.path.read_bytes() == bytes(1 << 20)
        setup.device.pwrite(b"y" * 512, 512)  # past sector 0: no lock involved
    finally:
        os.close(other)


def test_retry_waits_for_release_and_owns_its_data(setup: Setup) -> None:
    other = hold_lock(setup.path)
    data = bytearray(b"a" * 1024)
    try:
        with pytest.raises(WouldBlock) as caught:
            setup.device.pwrite(data, 0)
        data[:] = b"b" * 1024  # the caller reuses its buffer at once
        done = threading.Event()
        worker = threading.Thread(target=lambda: (caught.value.retry(), done.set()))
        worker.start()
        time.sleep(0.2)
        assert not done.is_set()  # still waiting for the other process
        # While the retry waits, the loop's next sector-0 write is refused at once too (the
        # export's own lock is held by the worker), not queued behind it on the loop.
        with pytest.raises(WouldBlock):
            setup.device.pwrite(b"c", 0)
    finally:
        os.close(other)
    worker.join(5)
    assert done.is_set()
    assert setup.path.read_bytes()[:1025] == b"a" * 1024 + b"\0"
    assert setup.timeouts == 0


def test_retry_gives_up_with_eio_and_counts(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "t.raw", wait=0.3)
    other = hold_lock(setup.path)
    try:
        with pytest.raises(WouldBlock) as caught:
            setup.device.pwrite(b"z" * 512, 0)
        started = time.monotonic()
        with pytest.raises(OSError) as failed:
            caught.value.retry()
        assert failed.value.errno == errno.EIO
        assert 0.25 < time.monotonic() - started < 2
        assert setup.timeouts == 1
        assert setup.path.read_bytes() == bytes(1 << 20)
    finally:
        os.close(other)
        setup.device.close()


def test_retried_header_write_is_still_refused(setup: Setup) -> None:
    header = QEMU_HEADERS["qcow2"]
    other = hold_lock(setup.path)
    with pytest.raises(WouldBlock) as caught:
        setup.device.pwrite(header, 0)
    os.close(other)
    with pytest.raises(HeaderWriteBlocked):
        caught.value.retry()
    assert setup.path.read_bytes() == bytes(1 << 20)


def test_free_lock_writes_inline(setup: Setup) -> None:
    setup.device.pwrite(b"q" * 600, 0)
    assert setup.path.read_bytes()[:601] == b"q" * 600 + b"\0"
