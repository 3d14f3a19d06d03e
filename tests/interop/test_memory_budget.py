"""A client that pipelines large READs and never reads the replies holds at most its byte
budget of the server's memory (max_buffered_bytes_per_connection): replies are made only
when the socket can take them, and a connection over budget is not read until its replies
drain. Measured as the server's peak RSS (VmHWM), then the replies are read and checked."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdguard.protocol.constants import Command
from tests.interop.conftest import ROOT, ExportSpec, RunningServer, require, start_server

pytestmark = pytest.mark.interop

BUDGET = 16 << 20
OVERHEAD = 100 << 20  # the bound the issue states: budget plus a fixed overhead


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    require("qemu-img")
    directory = tmp_path_factory.mktemp("budget")
    # compressed clusters: every read is inflated into memory (no file range to send)
    source, image = directory / "source.raw", directory / "q.qcow2"
    source.write_bytes(b"nbdguard budget test " * ((64 << 20) // 21 + 1))
    subprocess.run(
        ["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", source, image],
        check=True,
    )
    running = start_server(
        directory,
        [ExportSpec("q", image=image, format="qcow2"), ExportSpec("r", size=64 << 20)],
        max_buffered_bytes_per_connection=BUDGET,
    )
    yield running
    running.stop()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS


def hostile_reads(server: RunningServer, export: str, count: int, length: int) -> int:
    """Send `count` READs of `length` at once, wait, then read every reply: the server's
    peak RSS growth while the replies were not read."""
    pid = server.process.pid
    reset_peak(pid)
    before = peak_rss(pid)
    args = [str(server.socket_path), export, str(int(Command.READ)), str(count), "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.interop.hostile_client", *args, str(length), "0", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "sent"
    out, err = process.communicate(timeout=120)  # returns after the 3 s wait and the reads
    assert process.returncode == 0, err
    done, errors, _, _ = map(int, out.split())
    assert (done, errors) == (count, 0)  # every reply arrived, none an error
    return peak_rss(pid) - before


def test_qcow2_reads_not_read_by_the_client(server: RunningServer) -> None:
    grown = hostile_reads(server, "q", 64, 32 << 20)  # 2 GiB of replies asked for
    assert grown <= BUDGET + OVERHEAD, f"grew {grown >> 20} MiB"


def test_raw_reads_below_the_sendfile_threshold(server: RunningServer) -> None:
    grown = hostile_reads(server, "r", 16000, 65535)  # 1 GiB of preads
    assert grown <= BUDGET + OVERHEAD, f"grew {grown >> 20} MiB"
