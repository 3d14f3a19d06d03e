"""A served qcow2 image whose refcount blocks all claim to be full: allocating writes are
answered at once, another export's reads stay fast meanwhile, SIGTERM ends the server within
its drain bound, and `qemu-img check` afterwards finds only what was planted."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, require, start_server
from tests.storage.qcow2_patch import Qcow2File
from tests.storage.test_qcow2_hostile import check, damage, fill_refcounts

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop

MiB = 1 << 20
WRITES = 64


def test_full_refcount_blocks_served(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    image = tmp_path / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", str(image)],
        check=True,
        capture_output=True,
    )
    # 500 blocks of claims: before bounded allocation, about 10 s of CPU per allocation.
    fill_refcounts(Qcow2File(image), blocks=500, leaked=2)
    before = check(image)
    server = start_server(
        tmp_path / "srv",
        [ExportSpec("hostile", image=image, format="qcow2"), ExportSpec("other", size=8 << 20)],
    )
    try:
        writer, reader = nbd.NBD(), nbd.NBD()
        writer.connect_uri(server.uri("hostile"))
        reader.connect_uri(server.uri("other"))
        started = time.monotonic()
        cookies = [
            writer.aio_pwrite(
                nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536), MiB + i * 65536
            )
            for i in range(WRITES)
        ]
        worst = 0.0
        for index in range(20):  # the other export while the writes are served
            began = time.monotonic()
            reader.pread(4096, index * 4096)
            worst = max(worst, time.monotonic() - began)
        while writer.aio_in_flight() > 0:
            writer.poll(-1)
        assert all(writer.aio_command_completed(cookie) for cookie in cookies)
        elapsed = time.monotonic() - started
        writer.flush()
        assert writer.pread(65536, MiB + 5 * 65536) == bytes([6]) * 65536
        assert worst <= 0.1, f"worst read on the other export {worst * 1000:.1f} ms"
        assert elapsed < 5, f"{WRITES} allocating writes took {elapsed:.2f} s"
    finally:
        began = time.monotonic()
        code = server.stop()
        stopped = time.monotonic() - began
    assert code == 0, server.log()
    assert stopped < 5
    assert damage(check(image)) == damage(before)
    raw = tmp_path / "out.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True
    )
    data = raw.read_bytes()
    for i in range(WRITES):
        assert data[MiB + i * 65536 : MiB + (i + 1) * 65536] == bytes([i + 1]) * 65536
