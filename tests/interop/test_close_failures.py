"""A qcow2 export whose metadata cannot be written at shutdown (its file system is full):
the failure is logged with the export and step, the process exits 4 without a traceback,
and the image is left consistent (leaks at worst). That the other exports are still closed
is checked in tests/server/test_close_failures.py."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, require, run, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop

EXIT_CLOSE_FAILED = 4


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for this test (skipped where mounting is not permitted)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill(directory: Path) -> None:
    """Take every free block of the file system."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = bytes(4096)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as err:
        assert err.errno == 28, err  # ENOSPC
    finally:
        os.close(fd)


def test_enospc_on_qcow2_metadata_at_shutdown(tmp_path: Path, tiny_fs: Path) -> None:
    require("qemu-img")
    image = tiny_fs / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    server = start_server(
        tmp_path / "srv",
        [ExportSpec("q", image=image, format="qcow2"), ExportSpec("r", size=1 << 20)],
    )
    try:
        h = nbd.NBD()
        h.connect_uri(server.uri("q"))
        h.pwrite(b"\x33" * 65536, 32 << 20)  # a new L2 table and refcounts, not flushed
        h.shutdown()
        fill(tiny_fs)
    finally:
        status = server.stop()

    log = server.log()
    assert status == EXIT_CLOSE_FAILED, log
    assert "Traceback" not in log
    events = [json.loads(line) for line in log.splitlines()]
    failed = [event for event in events if event["event"] == "export.close_failed"]
    assert failed and {event["export"] for event in failed} == {"q"}
    assert failed[0]["step"] == "flush" and failed[0]["errno"] == "ENOSPC"
    [stopped] = [event for event in events if event["event"] == "server.stopped"]
    assert stopped["failed_exports"] == ["q"]
    (tiny_fs / "filler").unlink()
    checked = run("qemu-img", "check", "-f", "qcow2", str(image), check=False)
    assert checked.returncode in (0, 3), checked.stdout + checked.stderr  # 3: leaks only
