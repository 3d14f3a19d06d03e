"""Requests that are cheap to send and costly to serve do not stall other clients: while one
client pipelines them, another client's 4 KiB reads on another export stay fast (issue 18's
bound: p99 ≤ 100 ms), and the attacker still gets correct replies."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from nbdguard.protocol.constants import Command, CommandFlag
from tests.interop.conftest import ROOT, ExportSpec, RunningServer, require, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop

FRAGMENTED = 64 << 20  # 4 KiB of data every 16 KiB: 8192 extents
QCOW2 = 256 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    require("qemu-img", "qemu-io")
    directory = tmp_path_factory.mktemp("fair")
    fragmented = directory / "frag.raw"
    with open(fragmented, "wb") as handle:
        handle.truncate(FRAGMENTED)
        for offset in range(0, FRAGMENTED, 16 << 10):
            handle.seek(offset)
            handle.write(b"d" * 4096)
    small = directory / "small.qcow2"
    # every cluster allocated (metadata preallocation): zeroing and trimming walk them all
    options = "cluster_size=512,preallocation=metadata"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, small, str(QCOW2)], check=True
    )
    running = start_server(
        directory,
        [
            ExportSpec("frag", image=fragmented),
            ExportSpec("small", image=small, format="qcow2"),
            ExportSpec("other", size=8 << 20),
        ],
    )
    yield running
    running.stop()


def worst_read_latency_during(server: RunningServer, attack: subprocess.Popen[str]) -> float:
    """A second client's worst 4 KiB read latency, for as long as the attacker runs."""
    h = nbd.NBD()
    h.connect_uri(server.uri("other"))
    worst, reads = 0.0, 0
    try:
        while attack.poll() is None or reads < 20:
            started = time.monotonic()
            h.pread(4096, (reads * 4096) % (8 << 20))
            worst = max(worst, time.monotonic() - started)
            reads += 1
    finally:
        h.shutdown()
    return worst


def attack(
    server: RunningServer, export: str, command: Command, count: int, flags: int = 0
) -> subprocess.Popen[str]:
    """The hostile client, in its own process: `count` requests over the whole export, sent
    in one burst before any reply is read."""
    size = server.images[export].stat().st_size if export == "frag" else QCOW2
    args = [str(server.socket_path), export, str(int(command)), str(count), "0", str(size)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.interop.hostile_client", *args, str(flags)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def finish(process: subprocess.Popen[str], count: int, timeout: float = 120) -> tuple[int, int]:
    """The attacker's replies: all `count` answered without error; (fewest, most) extents."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    done, errors, fewest, most = map(int, out.split())
    assert (done, errors) == (count, 0)
    return fewest, most


def test_pipelined_block_status_over_many_extents(server: RunningServer) -> None:
    attacker = attack(server, "frag", Command.BLOCK_STATUS, 2000)
    worst = worst_read_latency_during(server, attacker)
    fewest, most = finish(attacker, 2000)
    assert worst <= 0.1, f"worst read {worst * 1000:.1f} ms"
    assert 1 <= fewest <= most <= 4096  # replies describe a prefix, bounded


def test_trim_and_zero_of_a_small_cluster_qcow2(server: RunningServer) -> None:
    for command in (Command.WRITE_ZEROES, Command.TRIM):
        attacker = attack(server, "small", command, 8)
        worst = worst_read_latency_during(server, attacker)
        finish(attacker, 8)
        assert worst <= 0.1, f"{command.name}: worst read {worst * 1000:.1f} ms"
    h = nbd.NBD()
    h.connect_uri(server.uri("small"))
    assert h.pread(512, 0) == bytes(512) and h.pread(512, QCOW2 - 512) == bytes(512)
    h.shutdown()


def test_zeroes_without_holes_on_raw(server: RunningServer) -> None:
    attacker = attack(server, "frag", Command.WRITE_ZEROES, 8, int(CommandFlag.NO_HOLE))
    worst = worst_read_latency_during(server, attacker)
    finish(attacker, 8)
    assert worst <= 0.1, f"worst read {worst * 1000:.1f} ms"
    h = nbd.NBD()
    h.connect_uri(server.uri("frag"))
    assert h.pread(4096, 16 << 10) == bytes(4096)
    h.shutdown()
