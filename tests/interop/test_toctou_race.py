"""The TOCTOU race against a live server: SIGHUP reloads add and remove a qcow2 export
whose backing file is a symlink that a helper process swaps, with renameat2
(RENAME_EXCHANGE), between a file inside the allowed directory and one outside it. Every
time the export comes up, a client reads it: the bytes are the inside file's, never the
outside one's; every time it does not, the server logged why (outside_allow_dirs or
changed_during_open). Meanwhile another export keeps answering."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, RunningServer, start_server, write_config
from tests.storage.test_pinned_race import INSIDE, MISLABELLED, OUTSIDE, REFUSALS, swapping

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.interop

ROUNDS = 1000  # each: one reload adding the export (one open of the chain), one removing it
SLOW_ROUNDS = 5000
SIZE = 1 << 20


class LogTail:
    """New JSON records of the server log, read incrementally."""

    def __init__(self, server: RunningServer) -> None:
        self.path = server.log_path
        self.offset = self.path.stat().st_size

    def until(self, event: str, timeout: float = 10.0) -> list[dict[str, object]]:
        """Records up to and including the next `event`."""
        records: list[dict[str, object]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.splitlines():
                record: dict[str, object] = json.loads(line)
                records.append(record)
                if record.get("event") == event:
                    return records
            time.sleep(0.005)  # the log is a file: nothing to wait on but its growth
        raise AssertionError(f"no {event} within {timeout} s; saw {records}")


def reload(
    server: RunningServer, tail: LogTail, specs: list[ExportSpec]
) -> list[dict[str, object]]:
    write_config(server.directory, specs, server.port)
    server.process.send_signal(signal.SIGHUP)
    return tail.until("config.reloaded")


def test_reloads_never_serve_the_outside_backing_file(tmp_path: Path, runslow: bool) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img missing")
    directory, outside = tmp_path / "srv", tmp_path / "outside"
    directory.mkdir()
    outside.mkdir()
    (directory / "inside.raw").write_bytes(INSIDE * SIZE)
    (outside / "secret.raw").write_bytes(OUTSIDE * SIZE)
    (directory / "img").symlink_to("inside.raw")
    (directory / "decoy").symlink_to(outside / "secret.raw")
    top = directory / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "img", "-F", "raw", str(top),
         str(SIZE)], check=True, capture_output=True,
    )  # fmt: skip
    stable = ExportSpec("stable", size=SIZE, fill=b"\x5a" * 4096)
    vm = ExportSpec("vm", image=top, format="qcow2", read_only=True)
    server = start_server(directory, [stable])
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    rounds = SLOW_ROUNDS if runslow else ROUNDS
    try:
        other = nbd.NBD()
        other.connect_uri(server.uri("stable"))
        tail = LogTail(server)
        with swapping(directory / "img", directory / "decoy") as swaps:
            for _ in range(rounds):
                records = reload(server, tail, [stable, vm])
                outcomes[served(server, records)] += 1
                start = time.monotonic()
                assert other.pread(4096, 0) == b"\x5a" * 4096
                slowest = max(slowest, time.monotonic() - start)
                reload(server, tail, [stable])
        other.shutdown()
    finally:
        assert server.stop() == 0, server.log()
    print(f"\n{rounds} adds under {swaps[0]} swaps: {dict(outcomes)}; "
          f"slowest 4 KiB read on another export {slowest * 1000:.1f} ms")  # fmt: skip
    assert swaps[0] > 1000
    assert outcomes["served"] > 0
    assert slowest < 1.0


def served(server: RunningServer, records: list[dict[str, object]]) -> str:
    """'served' (after reading the inside file's bytes through the export) or the reason
    the server gave for refusing it."""
    reloaded = records[-1]
    if reloaded["added"] == ["vm"]:
        handle = nbd.NBD()
        handle.connect_uri(server.uri("vm"))
        try:
            data = handle.pread(4096, 0)
        finally:
            handle.shutdown()
        assert data == INSIDE * 4096, "the export served the outside file"
        return "served"
    refused = [r for r in records if r.get("event") == "chain.refused" and r["export"] == "vm"]
    assert refused, f"vm neither added nor refused: {records}"
    reason, detail = str(refused[-1]["reason"]), str(refused[-1]["detail"])
    assert reason in REFUSALS or (reason == "open_failed" and detail in MISLABELLED), refused
    return reason
