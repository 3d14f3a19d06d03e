"""A client refusing to stop writing a qcow2 header into sector 0: every write is refused and
counted, but the log stays bounded (a burst of lines, then `log.suppressed` summaries)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop

QCOW2_HEADER = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(504)
WRITES = 500


def test_a_header_write_loop_keeps_the_log_bounded(tmp_path: Path) -> None:
    running = start_server(tmp_path / "srv", [ExportSpec("flood", size=1 << 20)], metrics=True)
    try:
        h = nbd.NBD()
        h.connect_uri(running.uri("flood"))
        refused = 0
        for _ in range(WRITES):
            try:
                h.pwrite(QCOW2_HEADER, 0)
            except nbd.Error:
                refused += 1
        assert refused == WRITES
        blocked = running.sample(
            "nbdguard_header_writes_blocked_total", export="flood", format="qcow2", command="write"
        )
        assert blocked == WRITES  # metrics count every one
        h.shutdown()
    finally:
        assert running.stop() == 0, running.log()
    lines = [json.loads(line) for line in running.log().splitlines() if line.startswith("{")]
    logged = [line for line in lines if line["event"] == "guard.header_write_blocked"]
    summaries = [line for line in lines if line["event"] == "log.suppressed"]
    assert 1 <= len(logged) <= 50
    assert summaries, running.log()
    assert all(s["suppressed_event"] == "guard.header_write_blocked" for s in summaries)
    assert all(s["export"] == "flood" for s in summaries)
    assert len(logged) + sum(s["count"] for s in summaries) == WRITES
    assert len(running.log()) < 40_000
