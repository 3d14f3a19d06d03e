"""`nbdguard serve` with check_on_open = "full": a qcow2 image whose L2 entry points into its
refcount table is refused at open (`chain.refused`, reason corrupt, the export down), a
leaked one is served (the leak logged), the other exports are served, and the repaired image
opens on SIGHUP."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, RunningServer, require, sample, start_server
from tests.storage.qcow2_patch import COPIED, Qcow2File

pytestmark = pytest.mark.interop

MiB = 1 << 20


def qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def make_image(path: Path) -> Path:
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 4k",
         str(path))  # fmt: skip
    return path


def events(server: RunningServer, name: str) -> list[dict[str, object]]:
    found = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def wait_for(server: RunningServer, name: str, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while len(events(server, name)) < count:
        assert time.monotonic() < deadline, server.log()
        assert server.process.poll() is None, server.log()
        time.sleep(0.05)


def test_serve_refuses_a_corrupt_image_under_full_and_serves_the_others(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    images = tmp_path / "images"
    images.mkdir()
    corrupt = make_image(images / "corrupt.qcow2")
    q = Qcow2File(corrupt)
    entry = q.l2_entry_at(MiB)
    original = q.u64(entry)
    q.set_u64(entry, q.refcount_table_offset | COPIED)
    leaked = make_image(images / "leaked.qcow2")
    leak = Qcow2File(leaked)
    leak.set_u64(leak.l2_entry_at(MiB), 0)
    full = {"check_on_open": "full"}
    exports = [
        ExportSpec("good", size=MiB, fill=b"\xc3" * 4096),
        ExportSpec("corrupt", image=corrupt, format="qcow2", extra=full),
        ExportSpec("leaked", image=leaked, format="qcow2", extra=full),
    ]
    server = start_server(tmp_path / "srv", exports, metrics=True)
    try:
        for name, expected in (("good", b"\xc3" * 4096), ("leaked", b"\x11" * 4096)):
            handle = nbd.NBD()
            handle.connect_uri(server.uri(name))
            assert handle.pread(4096, 0) == expected, name
            handle.shutdown()
        with pytest.raises(nbd.Error):
            nbd.NBD().connect_uri(server.uri("corrupt"))
        text = server.scrape()[1]
        assert sample(text, "nbdguard_chain_refused_total", export="corrupt", reason="corrupt") == 1
        assert sample(text, "nbdguard_export_up", export="corrupt") == 0
        assert sample(text, "nbdguard_export_up", export="leaked") == 1
        [refused] = events(server, "chain.refused")
        assert refused["export"] == "corrupt" and refused["reason"] == "corrupt"
        message = str(refused["message"])
        assert "overlap" in message and f"{q.refcount_table_offset:#x}" in message, message
        done = {event["export"]: event for event in events(server, "qcow2.check_done")}
        assert done["leaked"]["leaks"] == 1 and done["leaked"]["errors"] == 0, done
        assert done["corrupt"]["errors"] == 2, done  # the overlap and its refcount
        # repaired, then SIGHUP: the export is tried again, checked, and opened
        q.set_u64(entry, original)
        server.process.send_signal(signal.SIGHUP)
        wait_for(server, "qcow2.check_done", 3)
        wait_for(server, "config.reloaded", 1)
        handle = nbd.NBD()
        handle.connect_uri(server.uri("corrupt"))
        assert handle.pread(4096, MiB) == b"\x22" * 4096
        handle.shutdown()
    finally:
        assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()
