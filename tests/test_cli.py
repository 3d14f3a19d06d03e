"""The command line as an operator meets it: --version, check-config's verdicts, serving one
image without a config (--format IMAGE), --print-uri and captive --run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdguard import __version__
from nbdguard.captive import client_address, exit_status
from nbdguard.config import ListenAddress
from tests.guard.samples import QEMU_HEADERS
from tests.interop.conftest import require

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
# This checkout's package, whatever the cwd (the venv may hold another one).
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def nbdguard(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdguard", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=ENV,
        timeout=120,
    )


def qemu_img(*args: str, cwd: Path) -> None:
    subprocess.run(["qemu-img", *args], check=True, cwd=cwd, capture_output=True)


def raw_image(path: Path, size: int = 4 * MiB, head: bytes = b"") -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(head)
    return path


# --version


def test_version_prints_the_package_version() -> None:
    result = nbdguard("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"nbdguard {__version__}\n"
    with open(ROOT / "pyproject.toml", "rb") as handle:
        assert tomllib.load(handle)["project"]["version"] == __version__


# check-config


def config_file(directory: Path, body: str) -> Path:
    path = directory / "nbdguard.toml"
    path.write_text(body)
    return path


def export(name: str, path: str, fmt: str = "raw", extra: str = "") -> str:
    return f'[[exports]]\nname = "{name}"\npath = "{path}"\nformat = "{fmt}"\n{extra}'


def test_check_config_refuses_a_qcow2_image_declared_raw(tmp_path: Path) -> None:
    require("qemu-img")
    qemu_img("create", "-q", "-f", "qcow2", "vm.qcow2", "4M", cwd=tmp_path)
    config = config_file(tmp_path, export("vm", "vm.qcow2"))
    result = nbdguard("check-config", str(config))
    assert result.returncode == 1
    message = result.stderr
    assert message.startswith(f"nbdguard: {config}: exports[0]: export 'vm': ")
    assert "already holds a qcow2 header" in message
    assert 'set format = "qcow2"' in message and 'on_existing_header = "warn"' in message
    assert "OK" not in result.stdout
    # Either fix makes it pass: the right format...
    config_file(tmp_path, export("vm", "vm.qcow2", "qcow2"))
    assert nbdguard("check-config", str(config)).returncode == 0
    # ...or serving it raw on purpose, which is still said out loud.
    config_file(tmp_path, export("vm", "vm.qcow2", extra='on_existing_header = "warn"\n'))
    result = nbdguard("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning: export 'vm': sector 0 of" in result.stderr and "qcow2 header" in result.stderr


def test_check_config_names_a_foreign_header_and_how_to_convert(tmp_path: Path) -> None:
    raw_image(tmp_path / "old.raw", head=QEMU_HEADERS["vmdk"])
    config = config_file(tmp_path, export("old", "old.raw"))
    result = nbdguard("check-config", str(config))
    assert result.returncode == 1
    assert "already holds a vmdk header" in result.stderr
    assert "qemu-img convert -f vmdk" in result.stderr


def test_check_config_refuses_a_header_in_a_qcow2_data_file(tmp_path: Path) -> None:
    require("qemu-img")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "data_file=vm.data", "vm.qcow2", "4M", cwd=tmp_path
    )
    with open(tmp_path / "vm.data", "r+b") as data:
        data.write(QEMU_HEADERS["qcow2"])
    config = config_file(tmp_path, export("vm", "vm.qcow2", "qcow2"))
    result = nbdguard("check-config", str(config))
    assert result.returncode == 1
    assert f"sector 0 of {tmp_path / 'vm.data'} already holds a qcow2 header" in result.stderr
    assert 'if the guest wrote this header, set on_existing_header = "warn"' in result.stderr
    body = export("vm", "vm.qcow2", "qcow2", 'on_existing_header = "warn"\n')
    assert nbdguard("check-config", str(config_file(tmp_path, body))).returncode == 0
    body = export("vm", "vm.qcow2", "qcow2", 'header_guard = "off"\n')
    assert nbdguard("check-config", str(config_file(tmp_path, body))).returncode == 0


def test_check_config_passes_a_plain_raw_image_and_one_with_the_guard_off(tmp_path: Path) -> None:
    raw_image(tmp_path / "a.raw", head=b"\xeb\x63\x90" + bytes(509))  # a boot sector
    raw_image(tmp_path / "b.raw", head=QEMU_HEADERS["qcow2"])
    body = export("a", "a.raw") + export("b", "b.raw", extra='header_guard = "off"\n')
    result = nbdguard("check-config", str(config_file(tmp_path, body)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(": OK (2 export(s))\n")


def test_check_config_two_exports_on_one_file_through_a_symlink(tmp_path: Path) -> None:
    raw_image(tmp_path / "disk.raw")
    (tmp_path / "link.raw").symlink_to("disk.raw")
    config = config_file(tmp_path, export("a", "disk.raw") + export("b", "link.raw"))
    result = nbdguard("check-config", str(config))
    assert result.returncode == 2
    assert f'{config}: exports[1] ("b"): key "path"' in result.stderr
    assert 'is the same file as exports[0] ("a")' in result.stderr


def test_check_config_open_errors_name_the_config_file(tmp_path: Path) -> None:
    config = config_file(tmp_path, export("gone", "missing.raw") + export("ok", "ok.raw"))
    raw_image(tmp_path / "ok.raw")
    result = nbdguard("check-config", str(config))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nbdguard: {config}: exports[0]: ")
    assert "missing.raw" in lines[0]


def test_serve_refuses_an_existing_header_by_default(tmp_path: Path) -> None:
    image = raw_image(tmp_path / "disk.raw", head=QEMU_HEADERS["qcow2"])
    result = nbdguard("serve", "--format", "raw", str(image), "--run", "true")
    assert result.returncode == 1
    refused = [json.loads(line) for line in result.stderr.splitlines() if "export.refused" in line]
    assert refused and refused[0]["reason"] == "existing_header"


def test_serve_logs_name_the_config_file(tmp_path: Path) -> None:
    config = config_file(tmp_path, export("gone", "missing.raw"))
    result = nbdguard("serve", "--config", str(config), "--listen", f"unix://{tmp_path}/s")
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stderr.splitlines()]
    refused = next(event for event in events if event["event"] == "chain.refused")
    assert refused["config"] == str(config)
    assert next(e for e in events if e["event"] == "server.failed")["config"] == str(config)


def test_the_example_config_passes_after_the_command_its_header_gives(tmp_path: Path) -> None:
    require("qemu-img")
    example = ROOT / "config" / "nbdguard.example.toml"
    header = example.read_text().split("\n\n", 1)[0].splitlines()
    commands = [line[len("#   ") :] for line in header if line.startswith("#   ")]
    assert len(commands) == 1, "the header gives one command, indented under a comment"
    copy = tmp_path / "config" / example.name
    copy.parent.mkdir()
    copy.write_text(example.read_text())
    before = nbdguard("check-config", str(copy))
    assert before.returncode == 1  # nothing exists yet: the command is needed
    subprocess.run(["sh", "-ec", commands[0]], cwd=copy.parent, check=True)
    result = nbdguard("check-config", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{copy}: OK (4 export(s))\n" and result.stderr == ""


# Serving one image without a config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["disk.raw"], "--format is required with an image"),
        (["--format", "raw"], "--format: only with an IMAGE"),
        (["--read-only", "--name", "x"], "--read-only, --name: only with an IMAGE"),
        (["--format", "raw", "--allow-dir", ".", "disk.raw"], "--allow-dir applies to qcow2"),
        (["--config", "c.toml", "--format", "raw", "disk.raw"], "not both"),
    ],
)
def test_quick_serve_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = nbdguard("serve", *args, "--run", "true", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_the_format_is_never_guessed() -> None:
    result = nbdguard("serve", "--format", "auto", "disk.raw")
    assert result.returncode == 2 and "invalid choice: 'auto'" in result.stderr


class Served:
    def __init__(self, process: subprocess.Popen[str], uri: str) -> None:
        self.process = process
        self.uri = uri


Start = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Start]:
    """`nbdguard serve ... --print-uri` in the background; the first stdout line is the URI."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Served:
        log = open(tmp_path / f"serve{len(started)}.log", "w")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "nbdguard", "serve", "--print-uri", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        log.close()
        started.append(process)
        assert process.stdout is not None
        uri = process.stdout.readline().strip()  # printed once the listener accepts
        assert uri, (tmp_path / f"serve{len(started) - 1}.log").read_text()
        return Served(process, uri)

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def stop(served: Served) -> int:
    served.process.send_signal(signal.SIGTERM)
    return served.process.wait(timeout=30)


def test_quick_serve_raw_over_tcp(tmp_path: Path, serve: Start) -> None:
    require("nbdinfo", "qemu-io")
    image = raw_image(tmp_path / "disk.raw", size=8 * MiB)
    served = serve("--format", "raw", "--listen", "tcp://127.0.0.1:0", str(image))
    assert served.uri.startswith("nbd://127.0.0.1:") and served.uri.endswith("/")
    info = json.loads(
        subprocess.run(["nbdinfo", "--json", served.uri], capture_output=True, check=True).stdout
    )
    assert info["exports"][0]["export-size"] == 8 * MiB
    write = ["qemu-io", "-f", "raw", "-c", "write -P 0x5c 4096 4096", served.uri]
    subprocess.run(write, check=True, capture_output=True)
    assert stop(served) == 0
    assert image.read_bytes()[4096:8192] == b"\x5c" * 4096


def test_quick_serve_qcow2_read_only_with_a_name(tmp_path: Path, serve: Start) -> None:
    require("qemu-img", "qemu-io")
    qemu_img("create", "-q", "-f", "qcow2", "vm.qcow2", "16M", cwd=tmp_path)
    fill = ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64k", str(tmp_path / "vm.qcow2")]
    subprocess.run(fill, check=True, capture_output=True)
    listen = f"unix://{tmp_path}/nbd.sock"
    args = ("--format", "qcow2", "--read-only", "--name", "vm 1", "--listen", listen)
    served = serve(*args, str(tmp_path / "vm.qcow2"))
    assert served.uri == f"nbd+unix:///vm%201?socket={tmp_path}/nbd.sock"
    info = subprocess.run(
        ["qemu-img", "info", "-f", "raw", "--output=json", served.uri],
        capture_output=True,
        check=True,
        text=True,
    )
    assert json.loads(info.stdout)["virtual-size"] == 16 * MiB
    read = ["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xab 1M 64k", served.uri]
    assert (
        "Pattern verification failed"
        not in subprocess.run(read, check=True, capture_output=True, text=True).stdout
    )
    write = ["qemu-io", "-f", "raw", "-c", "write 0 4k", served.uri]
    refused = subprocess.run(write, capture_output=True, text=True)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr  # read-only
    assert stop(served) == 0


# Captive --run


def test_run_copies_an_image_out_with_nbdcopy(tmp_path: Path) -> None:
    require("nbdcopy")
    image = raw_image(tmp_path / "disk.raw", size=4 * MiB, head=os.urandom(MiB))
    command = 'nbdcopy "$uri" out.raw && printf "%s\\n%s\\n" "$uri" "$unixsocket" > env.txt'
    result = nbdguard("serve", "--format", "raw", str(image), "--run", command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.raw").read_bytes() == image.read_bytes()
    uri, socket_path = (tmp_path / "env.txt").read_text().splitlines()
    assert uri == f"nbd+unix:///?socket={socket_path}"  # a private socket, no TCP port
    assert not Path(socket_path).parent.exists()  # and its directory is gone


def test_run_with_qemu_img_on_a_qcow2_image(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    qemu_img("create", "-q", "-f", "qcow2", "vm.qcow2", "8M", cwd=tmp_path)
    command = "qemu-io -f raw -c 'write -P 0x77 0 64k' \"$uri\" && qemu-img convert -f raw"
    command += ' -O raw "$nbd" out.raw'
    result = nbdguard("serve", "-f", "qcow2", "vm.qcow2", "--run", command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = (tmp_path / "out.raw").read_bytes()
    assert len(out) == 8 * MiB and out[: 64 << 10] == b"\x77" * (64 << 10)
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(tmp_path / "vm.qcow2")])
    assert check.returncode == 0  # stopped cleanly: flushed and closed


@pytest.mark.parametrize(
    ("command", "status"),
    [
        ("exit 7", 7),
        ("kill -TERM $$", 128 + signal.SIGTERM),
        ('nbdcopy "$uri" /no/such/dir/x', None),
    ],
)
def test_run_exits_with_the_command_status(
    tmp_path: Path, command: str, status: int | None
) -> None:
    require("nbdcopy")
    raw_image(tmp_path / "disk.raw")
    result = nbdguard("serve", "--format", "raw", "disk.raw", "--run", command, cwd=tmp_path)
    if status is None:  # whatever nbdcopy itself exits with when it fails
        status = subprocess.run(["nbdcopy", "/dev/null", "/no/such/dir/x"]).returncode
        assert status != 0
    assert result.returncode == status, result.stderr
    stopped = [json.loads(line) for line in result.stderr.splitlines() if "server.stopped" in line]
    assert stopped == [stopped[0]] and stopped[0]["failed_exports"] == []


def test_run_with_a_config_uses_its_first_listener(tmp_path: Path) -> None:
    raw_image(tmp_path / "a.raw")
    body = f'[server]\nlisten = ["unix://{tmp_path}/a.sock"]\n' + export("a", "a.raw")
    config = config_file(tmp_path, body)
    result = nbdguard(
        "serve", "-c", str(config), "--run", 'echo "$uri"', "--log-format", "json", cwd=tmp_path
    )
    assert result.returncode == 0
    assert result.stdout == f"nbd+unix:///a?socket={tmp_path}/a.sock\n"


# URIs


def test_client_addresses() -> None:
    tcp = ListenAddress("tcp", host="0.0.0.0", port=10809)
    assert client_address(tcp, "", 10809).uri == "nbd://127.0.0.1:10809/"
    v6 = ListenAddress("tcp", host="::", port=0)
    assert client_address(v6, "a/b?c", 4242).uri == "nbd://[::1]:4242/a%2Fb%3Fc"
    unix = ListenAddress("unix", path="/run/nbd guard/s")
    address = client_address(unix, "vm1", 0)
    assert address.uri == "nbd+unix:///vm1?socket=/run/nbd%20guard/s"
    assert address.unix_socket == "/run/nbd guard/s"


def test_exit_status_follows_the_shell() -> None:
    assert [exit_status(code) for code in (0, 3, -9)] == [0, 3, 137]
