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


def test_systemd_units() -> None:
    service = (ROOT / "deploy/systemd/nbdguard.service").read_text()
    socket = (ROOT / "deploy/systemd/nbdguard.socket").read_text()
    assert re.search(r"^ExecStart=\S*nbdguard serve ", service, flags=re.MULTILINE)
    assert "Requires=nbdguard.socket" in service and "KillSignal=SIGTERM" in service
    assert re.search(r"^ListenStream=10809$", socket, flags=re.MULTILINE)


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
