"""kill -9 in the middle of writes to a qcow2 overlay, several times over: `qemu-img check`
must never find corruption (leaked clusters are allowed), and every write acknowledged
before a completed FLUSH must be there, read both by a restarted nbdguard and by qemu-img."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, RunningServer, require, start_server

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.interop

STRIDE = 12288  # slots straddle 4 KiB clusters and start unaligned: partial-cluster COW
SLOT = 4096 + 1000


def slot_data(slot: int) -> bytes:
    return random.Random(slot).randbytes(SLOT)


def slot_offset(slot: int) -> int:
    return 512 + slot * STRIDE


def serve(directory: Path, top: Path) -> RunningServer:
    return start_server(directory, [ExportSpec("vm", image=top, format="qcow2")])


def write_until_killed(server: RunningServer, first: int, rng: random.Random) -> list[int]:
    """Write slots with a FLUSH every few batches; kill -9 the server with writes in flight.
    Return the slots acknowledged before the last completed FLUSH."""
    handle = nbd.NBD()
    handle.connect_uri(server.uri("vm"))
    durable: list[int] = []
    acknowledged: list[int] = []
    slot = first
    for batch in range(rng.randrange(4, 10)):
        pending = []
        for _ in range(32):
            pending.append((slot, handle.aio_pwrite(slot_data(slot), slot_offset(slot))))
            slot += 1
        if batch % 3 == 2:
            handle.flush()  # waits for everything before it, then makes it durable
            acknowledged += [s for s, _ in pending]
            durable = list(acknowledged)
        else:
            while handle.aio_in_flight() > 0:
                handle.poll(-1)
            acknowledged += [s for s, cookie in pending if handle.aio_command_completed(cookie)]
    for _ in range(32):  # these are in flight when the server dies
        handle.aio_pwrite(slot_data(slot), slot_offset(slot))
        slot += 1
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    return durable


def check_exit_code(top: Path) -> int:
    result = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert result.returncode in (0, 3), result.stdout + result.stderr  # 2 = corruption
    return result.returncode


def test_kill_9_leaves_no_corruption_and_keeps_flushed_writes(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(
        "qemu-img create -q -f raw base.raw 64M && "
        "qemu-io -f raw -c 'write -P 0x5c 0 64M' base.raw >/dev/null && "
        "qemu-img create -q -f qcow2 -o cluster_size=4k -b base.raw -F raw top.qcow2 64M",
        shell=True, check=True, cwd=images,
    )  # fmt: skip
    top = images / "top.qcow2"
    rng = random.Random(4)
    durable: list[int] = []
    for round_number in range(4):
        server = serve(tmp_path / f"run{round_number}", top)
        handle = nbd.NBD()
        handle.connect_uri(server.uri("vm"))
        for slot in durable:  # everything flushed in earlier rounds survived the kills
            assert handle.pread(SLOT, slot_offset(slot)) == slot_data(slot), slot
        handle.shutdown()
        durable += write_until_killed(server, round_number * 1000, rng)
        check_exit_code(top)
    reference = images / "ref.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(top), str(reference)], check=True, cwd=images
    )
    data = reference.read_bytes()
    assert len(durable) > 100
    for slot in durable:
        assert data[slot_offset(slot) : slot_offset(slot) + SLOT] == slot_data(slot), slot
    untouched = slot_offset(999)  # never written: still the base's bytes
    assert data[untouched : untouched + SLOT] == b"\x5c" * SLOT
    subprocess.run(["qemu-img", "check", "-r", "leaks", str(top)], capture_output=True)
    assert check_exit_code(top) == 0  # after repairing leaks, nothing else is wrong
