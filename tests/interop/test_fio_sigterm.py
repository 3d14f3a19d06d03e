"""SIGTERM in the middle of a write-heavy fio run: the server drains and exits 0, and every
write fio saw acknowledged is in the image. fio records how far it got in its verify state
file; a second fio then verifies exactly those blocks in the image file itself."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, require, start_server

pytestmark = pytest.mark.interop

SIZE = "1G"
COMMON = ["--name=w", "--rw=randwrite", "--bs=4k", f"--size={SIZE}", "--verify=crc32c"]


def verified_blocks(output: str) -> int:
    match = re.search(r"issued rwts: total=(\d+),", output)
    assert match, output
    return int(match.group(1))


def test_sigterm_during_fio_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    require("fio")
    server = start_server(tmp_path / "srv", [ExportSpec("vm1", size=1 << 30)])
    writer = subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={server.uri('vm1')}", "--iodepth=32",
         "--verify_state_save=1", "--do_verify=0", *COMMON],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(1.0)
    assert writer.poll() is None, "fio finished before the signal: make the run longer"
    assert server.stop(signal.SIGTERM) == 0
    writer.communicate(timeout=60)
    check = subprocess.run(
        ["fio", "--ioengine=psync", f"--filename={server.images['vm1']}", "--verify_only",
         "--verify_state_load=1", *COMMON],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    blocks = verified_blocks(check.stdout)
    assert 500 < blocks < (1 << 30) // 4096  # stopped mid-run, with real progress
    log = server.log()
    assert '"server.stopping"' in log and '"server.stopped"' in log
