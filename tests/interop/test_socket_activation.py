"""systemd socket activation: a listening socket passed as fd 3 with LISTEN_FDS/LISTEN_PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.conftest import ROOT, require, run

pytestmark = pytest.mark.interop

# What systemd does between fork and exec: the socket becomes fd 3, LISTEN_PID names the
# process that will exec (same pid after exec), LISTEN_FDS counts the sockets.
LAUNCHER = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ['LISTEN_FDS'] = sys.argv[2]\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'nbdguard', *sys.argv[3:]])\n"
)


def activated(
    sock: socket.socket | int, config: Path, listen_fds: str = "1"
) -> subprocess.Popen[str]:
    fd = sock if isinstance(sock, int) else sock.fileno()
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(fd), listen_fds, "serve", "--config", str(config)],
        pass_fds=(fd,),
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


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _unbound_tcp() -> socket.socket:
    return socket.socket()


def _not_listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("make", "listen_fds", "message"),
    [
        (_listening, "one", "LISTEN_FDS='one' is not a number"),
        (_listening, "-1", "LISTEN_FDS='-1' is not a number"),
        (_listening, "100000", "LISTEN_FDS=100000 is more than 64"),
        (_listening, "64", r"descriptor \d+ is not (open|a socket)"),
        (_udp, "1", "descriptor 3 is a UDP socket"),
        (_unbound_tcp, "1", "descriptor 3 is not bound"),
        (_not_listening, "1", "descriptor 3 is not listening"),
    ],
)
def test_bad_inherited_descriptors_fail_the_start_cleanly(
    tmp_path: Path, make: Callable[[], socket.socket], listen_fds: str, message: str
) -> None:
    """Reported like every other start failure: `server.failed` with the reason, status 1,
    no traceback (and an unbound TCP socket is never served on 0.0.0.0)."""
    config = write_config(tmp_path)
    with make() as sock:
        process = activated(sock, config, listen_fds)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 1, err
    assert "Traceback" not in err
    [failed] = [json.loads(line) for line in err.splitlines() if "server.failed" in line]
    assert re.search(message, failed["error"]), failed


def test_a_file_passed_as_a_socket_fails_the_start_cleanly(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    fd = os.open(tmp_path / "d.raw", os.O_RDONLY)
    try:
        process = activated(fd, config)
        _, err = process.communicate(timeout=30)
    finally:
        os.close(fd)
    assert process.returncode == 1 and "Traceback" not in err, err
    assert "descriptor 3 is not a socket" in err
