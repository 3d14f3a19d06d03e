"""systemd socket activation: a listening socket passed as fd 3 with LISTEN_FDS/LISTEN_PID."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.conftest import ROOT, require, run

pytestmark = pytest.mark.interop

# What systemd does between fork and exec: the socket becomes fd 3, LISTEN_PID names the
# process that will exec (same pid after exec), LISTEN_FDS counts the sockets.
LAUNCHER = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'nbdguard', *sys.argv[2:]])\n"
)


def activated(sock: socket.socket, config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(sock.fileno()), "serve", "--config", str(config)],
        pass_fds=(sock.fileno(),),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "d.raw").write_bytes(bytes(2 << 20))
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nlisten = []\nlog_format = "json"\n'
        '[[exports]]\nname = "d"\npath = "d.raw"\nformat = "raw"\n'
    )
    return config


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_client_connects_through_an_inherited_socket(tmp_path: Path, family: str) -> None:
    require("qemu-img")
    config = write_config(tmp_path)
    if family == "tcp":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        uri = f"nbd://127.0.0.1:{sock.getsockname()[1]}/d"
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp_path / "act.sock"))
        uri = f"nbd+unix:///d?socket={tmp_path / 'act.sock'}"
    sock.listen(16)  # clients may connect before the server runs: the kernel queues them
    process = activated(sock, config)
    sock.close()
    try:
        info = json.loads(run("qemu-img", "info", "-f", "raw", "--output=json", uri).stdout)
        assert info["virtual-size"] == 2 << 20
        run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 4k", uri)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert '"socket_activated": true' in err
    assert (tmp_path / "d.raw").read_bytes()[:4096] == b"a" * 4096


def test_no_listeners_at_all_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "nbdguard", "serve", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "LISTEN_FDS" in result.stderr
