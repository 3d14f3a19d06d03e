"""The files operators deploy with: Prometheus config and rules, the Grafana dashboard and
provisioning, the Dockerfile, compose.yaml and the systemd units."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from nbdguard.config import load_config, parse_host_port
from nbdguard.server import notify
from tests.interop.conftest import ExportSpec, free_port, write_config

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "nbdguard.json"
RULES = ROOT / "config" / "prometheus" / "rules.yml"


def promql_expressions() -> list[str]:
    """Every PromQL expression in the dashboard and in the alerting rules."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load(RULES.read_text())
    found += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return found


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, check=False)


def test_promtool_accepts_config_and_rules() -> None:
    config = promtool("check", "config", str(ROOT / "config" / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alerts_cover_blocked_writes_export_down_and_errors() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert "nbdguard_header_writes_blocked_total" in alerts["NbdguardHeaderWriteBlocked"]["expr"]
    assert "nbdguard_export_up" in alerts["NbdguardExportDown"]["expr"]
    assert "nbdguard_request_errors_total" in alerts["NbdguardHighErrorRatio"]["expr"]


def test_dashboard_panels_all_query_something() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "nbdguard"
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in (
        "Throughput",
        "IOPS",
        "Latency",
        "Errors",
        "Connections",
        "Blocked header",
        "Chain refusals",
    ):
        assert any(wanted in title for title in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(target["expr"] for target in panel["targets"])
        assert all(target["datasource"]["uid"] == "prometheus" for target in panel["targets"])


def test_grafana_provisioning_matches_the_dashboard_location() -> None:
    datasources = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["uid"] == "prometheus"
    providers = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/nbdguard.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


def test_compose_wires_three_services_to_existing_files() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert set(compose["services"]) == {"nbdguard", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host != "./images":  # the operator's images, created by them
                assert (ROOT / host).exists(), host


def test_dockerfile_is_consistent_with_the_repository() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert re.search(r"^EXPOSE .*\b10809\b.*\b9109\b", text, flags=re.MULTILINE)
    user = re.search(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert user and user.group(1) not in ("root", "0")
    assert "HEALTHCHECK" in text and "/healthz" in text
    entry = re.search(r"^ENTRYPOINT (.+)$", text, flags=re.MULTILINE)
    assert entry
    entrypoint = json.loads(entry.group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["nbdguard"] and "nbdguard" in scripts


SYSTEMD = ROOT / "deploy" / "systemd"
INSTALL_SYSTEM = ROOT / "scripts" / "install-system.sh"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A unit file as "Section.Key" -> every value, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def install_prefix() -> str:
    """Where install-system.sh makes its venv."""
    found = re.search(r"^PREFIX=(\S+)$", INSTALL_SYSTEM.read_text(), flags=re.MULTILINE)
    assert found, "install-system.sh names no PREFIX"
    return found.group(1)


@pytest.fixture
def staged_root(tmp_path: Path) -> Path:
    """The files install-system.sh installs, staged under a root (DESTDIR)."""
    root = tmp_path / "root"
    staged = subprocess.run(
        ["bash", str(INSTALL_SYSTEM)],
        env=dict(os.environ, DESTDIR=str(root)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert staged.returncode == 0, staged.stdout + staged.stderr
    return root


def test_install_system_stages_units_config_docs_and_a_scratch_image(staged_root: Path) -> None:
    service = unit_settings(staged_root / "etc/systemd/system/nbdguard.service")
    socket_unit = unit_settings(staged_root / "etc/systemd/system/nbdguard.socket")
    for url in service["Unit.Documentation"] + socket_unit["Unit.Documentation"]:
        assert url.startswith("file:///") and (staged_root / url[len("file:///") :]).is_file()
    exec_start = service["Service.ExecStart"][0].split()
    assert exec_start[0] == f"{install_prefix()}/bin/nbdguard"
    config_path = exec_start[exec_start.index("--config") + 1]
    installed = staged_root / config_path.lstrip("/")
    assert installed.read_text() == (SYSTEMD / "nbdguard.toml").read_text()
    assert installed.stat().st_mode & 0o007 == 0  # not world-readable
    config = load_config(SYSTEMD / "nbdguard.toml")
    for export in config.exports:
        image = staged_root / str(export.path).lstrip("/")
        assert image.stat().st_size == 1 << 30 and image.stat().st_blocks == 0  # sparse


def test_install_system_keeps_an_existing_config(staged_root: Path) -> None:
    config = staged_root / "etc/nbdguard/nbdguard.toml"
    config.write_text("# the operator's\n")
    (staged_root / "var/lib/nbdguard/scratch.raw").unlink()
    again = subprocess.run(
        ["bash", str(INSTALL_SYSTEM)],
        env=dict(os.environ, DESTDIR=str(staged_root)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert config.read_text() == "# the operator's\n"
    assert not (staged_root / "var/lib/nbdguard/scratch.raw").exists()


def test_systemd_analyze_verify_accepts_the_installed_units(staged_root: Path) -> None:
    """`systemd-analyze verify` on the units as installed: every command must exist (the
    venv's nbdguard where install-system.sh makes it), every key must be known."""
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    units = Path("/usr/lib/systemd/system")
    shutil.copytree(units, staged_root / "usr/lib/systemd/system", symlinks=True)
    (staged_root / "usr/bin").mkdir(parents=True)
    for link in ("lib", "bin", "sbin"):
        (staged_root / link).symlink_to(f"usr/{link}")
    service = unit_settings(staged_root / "etc/systemd/system/nbdguard.service")
    for command in service["Service.ExecReload"]:
        program = command.split()[0]  # a system binary: it must exist on this host too
        (staged_root / "usr/bin" / Path(program).name).write_bytes(Path(program).read_bytes())
        (staged_root / "usr/bin" / Path(program).name).chmod(0o755)
    venv_program = staged_root / install_prefix().lstrip("/") / "bin" / "nbdguard"
    venv_program.parent.mkdir(parents=True)
    venv_program.write_text("#!/bin/sh\n")  # the venv itself is made by pip, not staged
    venv_program.chmod(0o755)
    verified = subprocess.run(
        [binary, "verify", f"--root={staged_root}", "nbdguard.service", "nbdguard.socket"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


def test_systemd_service_settings() -> None:
    service = unit_settings(SYSTEMD / "nbdguard.service")
    assert service["Service.Type"] == ["notify"]
    assert service["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Service.User"][0] not in ("root", "0")
    assert service["Service.RuntimeDirectory"] == ["nbdguard"]
    assert service["Service.RuntimeDirectoryPreserve"] == ["yes"]  # the socket unit's file
    assert service["Service.StateDirectory"] == ["nbdguard"]
    assert service["Service.ProtectSystem"] == ["strict"]
    assert service["Service.NoNewPrivileges"] == ["true"]
    assert service["Service.PrivateTmp"] == ["true"]
    assert service["Service.CapabilityBoundingSet"] == [""]  # no capability at all
    writable = [Path(p) for value in service["Service.ReadWritePaths"] for p in value.split()]
    for export in load_config(SYSTEMD / "nbdguard.toml").exports:
        assert any(export.path.is_relative_to(directory) for directory in writable), export
    assert "nbdguard.socket" in service["Unit.Requires"][0].split()


def test_systemd_socket_matches_the_example_config_and_the_installed_one() -> None:
    """The socket unit binds exactly the example's listeners; the installed config leaves
    listen empty, so the server does not bind them a second time."""
    socket_unit = unit_settings(SYSTEMD / "nbdguard.socket")
    service = unit_settings(SYSTEMD / "nbdguard.service")
    example = tomllib.loads((ROOT / "config" / "nbdguard.example.toml").read_text())
    wanted = {
        address.removeprefix("tcp://").removeprefix("unix://")
        for address in example["server"]["listen"]
    }
    assert set(socket_unit["Socket.ListenStream"]) == wanted
    for path in (Path(a) for a in wanted if a.startswith("/")):
        assert path.parent == Path("/run") / service["Service.RuntimeDirectory"][0]
    installed = load_config(SYSTEMD / "nbdguard.toml")
    assert socket_unit["Socket.SocketMode"] == [f"{installed.server.socket_mode:04o}"]
    assert socket_unit["Socket.SocketGroup"] == service["Service.Group"]
    assert installed.server.listen == ()
    assert installed.server.metrics_listen == parse_host_port(example["server"]["metrics_listen"])


def test_ci_installs_systemd_analyze() -> None:
    assert re.search(r"PACKAGES=\([^)]*\bsystemd\b", (ROOT / "scripts/install.sh").read_text())


# -- systemd's notify protocol, against a live `nbdguard serve` -------------------------------


@dataclass
class NotifiedServer:
    process: subprocess.Popen[bytes]
    receiver: socket.socket
    nbd_port: int
    metrics_port: int
    log: Path

    def message(self) -> set[str]:
        """The next datagram's fields (waits for it: the receiver has a timeout)."""
        try:
            data = self.receiver.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no notification\n{self.log.read_text()}") from None
        return set(data.decode().split("\n"))

    def health(self) -> int:
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code


@contextlib.contextmanager
def notified_server(
    tmp_path: Path, address: str, *, image: bool = True
) -> Iterator[NotifiedServer]:
    """`nbdguard serve` with NOTIFY_SOCKET naming a datagram socket this test reads."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + address[1:] if address.startswith("@") else address)
    receiver.settimeout(30)
    nbd_port, metrics_port = free_port(), free_port()
    export = ExportSpec("d", size=1 << 20)
    if image:
        with open(export.image_path(tmp_path), "wb") as handle:
            handle.truncate(export.size)
    config = write_config(tmp_path, [export], nbd_port, metrics_listen=f"127.0.0.1:{metrics_port}")
    log = tmp_path / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "nbdguard", "serve", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, NOTIFY_SOCKET=address),
        )
    try:
        yield NotifiedServer(process, receiver, nbd_port, metrics_port, log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        receiver.close()


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_reloading_stopping(tmp_path: Path, kind: str) -> None:
    address = str(tmp_path / "notify") if kind == "path" else f"@nbdguard-{uuid.uuid4().hex}"
    with notified_server(tmp_path, address) as server:
        assert {"READY=1", "STATUS=serving 1 export(s)"} <= server.message()
        # READY=1 means every export is open and every listener accepts: /healthz says so
        # at once, and the NBD port greets.
        assert server.health() == 200
        with socket.create_connection(("127.0.0.1", server.nbd_port), timeout=5) as client:
            assert client.recv(8) == b"NBDMAGIC"
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(str(tmp_path / "nbd.sock"))
            assert client.recv(8) == b"NBDMAGIC"
        server.process.send_signal(signal.SIGHUP)
        reloading = server.message()
        assert "RELOADING=1" in reloading
        assert any(re.fullmatch(r"MONOTONIC_USEC=\d+", field) for field in reloading)
        assert "READY=1" in server.message()
        server.process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in server.message()
        assert server.process.wait(timeout=30) == 0


@pytest.mark.interop
def test_notify_no_ready_when_the_start_fails(tmp_path: Path) -> None:
    """No export can be opened: the server exits 1 and never claims to be ready."""
    with notified_server(tmp_path, str(tmp_path / "notify"), image=False) as server:
        assert server.process.wait(timeout=30) == 1
        server.receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.receiver.recv(4096)


def test_notify_without_a_listener_never_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, an unknown transport, or a socket nobody reads: nothing sent, nothing raised."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.stopping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert notify.reloading() is False
