"""The command line and the server's lifecycle, as an operator meets them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop.conftest import (
    ROOT,
    ExportSpec,
    RunningServer,
    free_port,
    require,
    run,
    start_server,
    write_config,
)
from tests.interop.conftest import _wait_ready as wait_ready

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop


def nbdguard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdguard", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=env,
    )


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(bytes(4096))
    config = tmp_path / "c.toml"
    config.write_text('[[exports]]\nname = "a"\npath = "a.raw"\nformat = "raw"\n')
    result = nbdguard("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK (1 export" in result.stdout


def test_check_config_names_export_and_path_of_a_missing_image(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[exports]]\nname = "vm7"\npath = "gone.raw"\nformat = "raw"\n')
    result = nbdguard("check-config", str(config))
    assert result.returncode == 1
    assert "vm7" in result.stderr and "gone.raw" in result.stderr


def test_config_errors_exit_2_with_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[exports]]\nname = "a"\npath = "a.raw"\nformat = "auto"\nbogus = 1\n')
    for args in (["check-config", str(config)], ["serve", "--config", str(config)]):
        result = nbdguard(*args)
        assert result.returncode == 2
        assert '"raw"' in result.stderr and "bogus" in result.stderr


def test_serve_without_config_offers_a_scratch_export(tmp_path: Path) -> None:
    require("nbdinfo")
    env = dict(os.environ, NBDGUARD_STATE_DIR=str(tmp_path / "state"))
    sock = tmp_path / "s.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "nbdguard", "serve", "--listen", f"unix://{sock}"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        listed = json.loads(
            run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}").stdout
        )
        [export] = listed["exports"]
        assert export["export-name"] == "scratch" and export["export-size"] == 1 << 30
        assert (tmp_path / "state" / "scratch.raw").stat().st_size == 1 << 30
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0
    assert "server.scratch_mode" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_flushes_and_exits_0(tmp_path: Path, sig: int) -> None:
    server = start_server(tmp_path / "srv", [ExportSpec("vm1", size=16 << 20)])
    h = nbd.NBD()
    h.connect_uri(server.uri("vm1"))
    cookies = [
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536), i * 65536)
        for i in range(32)
    ]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    assert server.stop(sig) == 0
    data = server.images["vm1"].read_bytes()
    for i in range(32):
        assert data[i * 65536 : (i + 1) * 65536] == bytes([i + 1]) * 65536
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    log = server.log()
    assert "server.stopping" in log and "server.stopped" in log


def test_second_server_cannot_open_a_served_image(tmp_path: Path) -> None:
    server = start_server(tmp_path / "srv", [ExportSpec("vm1", size=1 << 20)])
    config = tmp_path / "srv" / "nbdguard.toml"
    other = tmp_path / "other.toml"
    text = config.read_text().replace(str(tmp_path / "srv" / "nbd.sock"), str(tmp_path / "o.sock"))
    other.write_text(text.replace(f"tcp://127.0.0.1:{server.port}", "tcp://127.0.0.1:0"))
    (tmp_path / "vm1.raw").symlink_to(server.images["vm1"])
    result = nbdguard("serve", "--config", str(other))
    assert result.returncode == 1
    assert "locked" in result.stderr
    assert server.stop() == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_several_listeners_including_ipv6(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-img")
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 20))
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port6 = probe.getsockname()[1]
    port4 = free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp://[::1]:{port6}", "tcp://127.0.0.1:{port4}", '
        f'"unix://a.sock", "unix://b.sock"]\n'
        '[[exports]]\nname = "d"\npath = "d.raw"\nformat = "raw"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "nbdguard", "serve", "--config", str(config)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "b.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        uris = [
            f"nbd://[::1]:{port6}/d",
            f"nbd://127.0.0.1:{port4}/d",
            f"nbd+unix:///d?socket={tmp_path / 'a.sock'}",
            f"nbd+unix:///d?socket={tmp_path / 'b.sock'}",
        ]
        for uri in uris:
            info = json.loads(run("qemu-img", "info", "-f", "raw", "--output=json", uri).stdout)
            assert info["virtual-size"] == 1 << 20, uri
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    assert process.returncode == 0
    assert not (tmp_path / "a.sock").exists()  # sockets are removed on exit


def _reachable(socket_path: Path, export: str = "vm1") -> bytes:
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export}?socket={socket_path}")
    try:
        return bytes(h.pread(512, 0))
    finally:
        h.shutdown()


def _identity(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


@pytest.mark.parametrize("clash", ["same_config", "same_socket", "same_port"])
def test_a_second_server_that_fails_to_start_leaves_the_first_reachable(
    tmp_path: Path, clash: str
) -> None:
    """Same config (its export is locked), or another image on the same Unix socket (live),
    or on the same TCP port (after binding its own Unix socket, which it removes): the
    second server fails with the reason and the first one's socket is untouched."""
    server = start_server(tmp_path / "srv", [ExportSpec("vm1", size=1 << 20, fill=b"\x11" * 512)])
    config = tmp_path / "srv" / "nbdguard.toml"
    before = _identity(server.socket_path)
    other = tmp_path / "other.toml"
    text = config.read_text().replace(str(server.images["vm1"]), str(tmp_path / "o.raw"))
    (tmp_path / "o.raw").write_bytes(bytes(1 << 20))
    expected = {
        "same_config": "locked",
        "same_socket": "another server is using it",
        "same_port": f"cannot listen on tcp://127.0.0.1:{server.port}",
    }[clash]
    if clash == "same_config":
        other = config
    elif clash == "same_socket":
        other.write_text(text.replace(f"tcp://127.0.0.1:{server.port}", "tcp://127.0.0.1:0"))
    else:
        other.write_text(text.replace(str(server.socket_path), str(tmp_path / "o.sock")))
    result = nbdguard("serve", "--config", str(other))
    assert result.returncode == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.sock").exists()  # its own socket, bound and then removed
    assert _identity(server.socket_path) == before
    assert _reachable(server.socket_path) == b"\x11" * 512
    assert server.stop() == 0
    assert not server.socket_path.exists()


def _start_on(socket_path: Path, directory: Path, spec: ExportSpec) -> RunningServer:
    """A server like start_server's, whose Unix socket is `socket_path`."""
    directory.mkdir()
    image = spec.image_path(directory)
    image.write_bytes(spec.fill.ljust(spec.size, b"\0"))
    port = free_port()
    config = write_config(directory, [spec], port)
    config.write_text(config.read_text().replace(str(directory / "nbd.sock"), str(socket_path)))
    log_path = directory / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "nbdguard", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    running = RunningServer(process, directory, socket_path, port, {spec.name: image}, log_path)
    wait_ready(running)
    return running


def test_a_server_leaves_a_socket_that_replaced_its_own(tmp_path: Path) -> None:
    """Its socket file was removed and another server bound the path: at exit the first
    server removes nothing and says so; the second stays reachable."""
    first = start_server(tmp_path / "a", [ExportSpec("vm1", size=1 << 20)])
    first.socket_path.unlink()
    second = _start_on(
        first.socket_path, tmp_path / "b", ExportSpec("vm1", size=1 << 20, fill=b"\x22" * 512)
    )
    try:
        assert first.stop() == 0, first.log()
        assert "server.socket_kept" in first.log()
        assert _reachable(second.socket_path) == b"\x22" * 512
    finally:
        assert second.stop() == 0, second.log()
    assert not second.socket_path.exists()


@pytest.mark.parametrize(("configured", "expected"), [(None, 0o660), ("0600", 0o600)])
def test_unix_socket_mode_under_umask_000(
    tmp_path: Path, configured: str | None, expected: int
) -> None:
    keys = {} if configured is None else {"socket_mode": configured}
    previous = os.umask(0)  # the server inherits it
    try:
        server = start_server(tmp_path / "srv", [ExportSpec("vm1", size=1 << 20)], **keys)
    finally:
        os.umask(previous)
    try:
        assert os.lstat(server.socket_path).st_mode & 0o777 == expected
    finally:
        assert server.stop() == 0
