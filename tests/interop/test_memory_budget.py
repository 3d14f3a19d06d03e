"""A client that pipelines large READs and never reads the replies holds at most its byte
budget of the server's memory (max_buffered_bytes_per_connection), and all connections
together at most the server's (memory_budget): replies are made only when the socket can
take them, and a connection over budget is not read until its replies drain.

Each attack runs against a live server and measures three things: the server's peak RSS
(VmHWM) growth, within the budget plus a fixed overhead; another client's 4 KiB reads of
another export meanwhile, p99 within 100 ms; and, once the attacker reads its replies,
that every one arrived and holds the image's bytes (hostile_client --expect)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdguard.protocol.constants import Command
from tests.interop.conftest import ROOT, ExportSpec, RunningServer, require, start_server
from tests.interop.test_tls import SERVER_EXT, make_ca, make_cert

pytestmark = pytest.mark.interop

MiB = 1 << 20
BUDGET = 16 * MiB  # max_buffered_bytes_per_connection
TOTAL = 64 * MiB  # memory_budget
OVERHEAD = 100 * MiB  # the bound the issue states: budget plus a fixed overhead
P99 = 0.1  # another client's 4 KiB read, seconds
HOLD = 3.0  # seconds an attacker leaves its replies unread
CLUSTER = 64 * 1024
# bytes(range(251)) repeated: a prime period, so data from a wrong offset does not match
PATTERN = bytes(range(251)) * (64 * MiB // 251 + 1)


def fragmented_qcow2(directory: Path, size: int) -> tuple[Path, Path]:
    """A qcow2 of 64 KiB clusters with every other one written (each its own byte, from
    the last to the first, so guest and host order differ), and a raw twin to check
    against. A 32 MiB read of it is 512 pieces, alternately data and hole."""
    image, twin = directory / "frag.qcow2", directory / "frag.raw"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", image,
         str(size)], check=True,
    )  # fmt: skip
    written = range(size // CLUSTER - 2, -1, -2)
    commands = [f"write -q -P {1 + k // 2 % 255} {k * CLUSTER} {CLUSTER}" for k in written]
    options = [arg for command in commands for arg in ("-c", command)]
    # one qemu-io for every write; cache=unsafe: no flush after each of them
    qemu_io = ["qemu-io", "-t", "unsafe", "-f", "qcow2", *options, str(image)]
    subprocess.run(qemu_io, check=True, capture_output=True)
    with open(twin, "wb") as handle:
        handle.truncate(size)
        for k in written:
            handle.seek(k * CLUSTER)
            handle.write(bytes([1 + k // 2 % 255]) * CLUSTER)
    return image, twin


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The images and the server's certificate, made once for every test's server."""
    require("qemu-img", "qemu-io", "openssl")
    directory = tmp_path_factory.mktemp("budget")
    # compressed clusters: every read is inflated into memory (no file range to send)
    source = directory / "source.raw"
    source.write_bytes(b"nbdguard budget test " * ((64 * MiB) // 21 + 1))
    subprocess.run(
        ["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", source,
         directory / "q.qcow2"], check=True,
    )  # fmt: skip
    (directory / "r.raw").write_bytes(PATTERN[: 64 * MiB])
    fragmented_qcow2(directory, 256 * MiB)
    make_ca(directory, "ca")
    make_cert(directory, "server", "/CN=localhost", SERVER_EXT)
    return directory


@pytest.fixture
def server(images: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """A fresh server per attack: glibc keeps freed buffers in the heap (nbdguard raises
    its trim threshold), so on a server that already served an attack, the next one's
    peak RSS would hide up to that much held memory."""
    running = start_server(
        tmp_path / "srv",
        [
            ExportSpec("q", image=images / "q.qcow2", format="qcow2"),
            ExportSpec("r", image=images / "r.raw"),
            ExportSpec("frag", image=images / "frag.qcow2", format="qcow2"),
            ExportSpec("other", size=MiB, fill=b"\x5a" * 4096),  # the LatencyProbe's
        ],
        max_buffered_bytes_per_connection=BUDGET,
        memory_budget=TOTAL,
        max_connections_per_client=64,  # every client here is this uid
        tls={
            "mode": "on",  # TLS for the attacker, plain for the probe
            "cert": str(images / "server-cert.pem"),
            "key": str(images / "server-key.pem"),
        },
    )
    yield running
    assert running.stop() == 0, running.log()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS


@dataclass
class Attack:
    grown: int  # the server's peak RSS growth over the attack and the drain, bytes
    attack: list[float]  # another client's 4 KiB read latencies while replies go unread
    drain: list[float]  # ... and while the attacker reads them

    def check(self, bound: int) -> None:
        """RSS within `bound`, the other client served while the replies went unread."""
        assert self.grown <= bound, f"grew {self.grown / MiB:.0f} MiB (bound {bound / MiB:.0f})"
        assert self.attack, "the probe timed no read"
        assert p99(self.attack) <= P99, f"another client's p99 {p99(self.attack) * 1000:.0f} ms"


def p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[int(len(ordered) * 0.99)] if ordered else 0.0


def hostile_reads(
    server: RunningServer,
    export: str,
    count: int,
    length: int,
    *options: str,
    connections: int = 1,
    read: int | None = None,
    hold: float = HOLD,
) -> Attack:
    """Send `count` READs of `length` at once on each of `connections`, read none of the
    replies for `hold` seconds, then read (the first `read` of each connection's, or all)
    and check them; another client's reads are timed throughout."""
    from tests.interop.test_payload_budget import LatencyProbe  # it imports this module

    pid = server.process.pid
    args = [str(server.socket_path), export, str(int(Command.READ)), str(count), "0"]
    args += [str(length), "--hold", "--connections", str(connections), *options]
    if read is not None:
        args += ["--read", str(read)]
    reset_peak(pid)
    before = peak_rss(pid)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.interop.hostile_client", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "sent", process.communicate()[1]
    with LatencyProbe(server) as attack:
        time.sleep(hold)  # the attack itself: this long with every reply asked for, unread
    with LatencyProbe(server) as drain:
        out, err = process.communicate("go\n", timeout=120)
    grown = peak_rss(pid) - before
    assert process.returncode == 0, err  # hostile_client checked each reply it read
    done, errors, _, _ = map(int, out.split())
    expected = connections * (count if read is None else min(read, count))
    assert (done, errors) == (expected, 0)  # every reply arrived, none an error
    return Attack(grown, attack.times, drain.times)


def test_qcow2_reads_not_read_by_the_client(server: RunningServer, images: Path) -> None:
    """64 x 32 MiB of compressed clusters (2 GiB, each inflated into memory): 2016 MiB
    before replies were made lazily."""
    source = str(images / "source.raw")
    attack = hostile_reads(
        server, "q", 64, 32 * MiB, "--expect", source, "--stride", str(MiB + 21), "--span",
        str(32 * MiB),
    )  # fmt: skip
    attack.check(BUDGET + OVERHEAD)


def test_raw_reads_below_the_sendfile_threshold(server: RunningServer, images: Path) -> None:
    """16000 x 65535 bytes, one connection: preads, not file ranges (490 MiB before)."""
    image = str(images / "r.raw")
    attack = hostile_reads(
        server, "r", 16000, 65535, "--expect", image, "--stride", "65535", "--span",
        str(63 * MiB),
    )  # fmt: skip
    attack.check(BUDGET + OVERHEAD)


def test_raw_reads_under_tls(server: RunningServer, images: Path) -> None:
    """400 x 32 MiB of a raw export through STARTTLS (12.5 GiB; past 6 GiB before): TLS
    needs the bytes, so no range leaves by sendfile. The first 32 replies are read and
    checked (all 400 would be 30 s of decryption here), then the attacker hangs up."""
    image, ca = str(images / "r.raw"), str(images / "ca-cert.pem")
    attack = hostile_reads(
        server, "r", 400, 32 * MiB, "--tls-ca", ca, "--expect", image, "--stride",
        str(MiB + 4097), "--span", str(32 * MiB), read=32,
    )  # fmt: skip
    attack.check(BUDGET + OVERHEAD)


def test_structured_reads_of_a_fragmented_qcow2(server: RunningServer, images: Path) -> None:
    """150 x 32 MiB structured reads, each 512 alternating data and hole chunks
    (4.8 GiB before)."""
    twin = str(images / "frag.raw")
    attack = hostile_reads(
        server, "frag", 150, 32 * MiB, "--expect", twin, "--stride", str(MiB + CLUSTER),
        "--span", str(224 * MiB),
    )  # fmt: skip
    attack.check(BUDGET + OVERHEAD)


def test_small_raw_reads_from_20_connections(server: RunningServer, images: Path) -> None:
    """20 connections x 512 x 65535 bytes (640 MiB; past 6 GiB in 6 s before): each
    connection alone stays within its 16 MiB, so only memory_budget bounds them together."""
    image = str(images / "r.raw")
    attack = hostile_reads(
        server, "r", 512, 65535, "--expect", image, "--stride", "65535", "--span",
        str(63 * MiB), connections=20,
    )  # fmt: skip
    attack.check(TOTAL + OVERHEAD)


def test_raw_reads_under_tls_from_3_connections(server: RunningServer, images: Path) -> None:
    """The TLS attack from three connections at once: memory_budget bounds them together."""
    image, ca = str(images / "r.raw"), str(images / "ca-cert.pem")
    attack = hostile_reads(
        server, "r", 400, 32 * MiB, "--tls-ca", ca, "--expect", image, "--stride",
        str(MiB + 4097), "--span", str(32 * MiB), read=2, connections=3,
    )  # fmt: skip
    attack.check(TOTAL + OVERHEAD)


def test_draining_inflated_replies_leaves_the_loop_to_others(server: RunningServer) -> None:
    """32 x 32 MiB of compressed clusters, then read as fast as they come: another client
    is still served meanwhile (the drain is part of the attack: reading costs the client
    nothing, inflating costs the server's only thread)."""
    attack = hostile_reads(server, "q", 32, 32 * MiB, hold=0.5)
    assert attack.drain, "the probe timed no read"
    assert p99(attack.drain) <= P99, f"another client's p99 {p99(attack.drain) * 1000:.0f} ms"
