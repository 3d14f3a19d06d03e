"""The files operators deploy with: Prometheus config and rules, the Grafana dashboard and
provisioning, the Dockerfile with its entrypoint and health check, compose.yaml, the systemd
units with scripts/install-system.sh, and the notify protocol the service unit relies on."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
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
from tests.interop.conftest import (
    ExportSpec,
    free_port,
    require,
    run,
    start_server,
    write_config,
)

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


def dockerfile_copies() -> dict[str, str]:
    """COPY destination -> source, for the single-source COPY lines of the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text()
    pairs = (line.split() for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE))
    return {words[-1]: words[0] for words in pairs if len(words) == 2}


def test_dockerfile_is_consistent_with_the_repository() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert re.search(r"^FROM \S+:\d+\.\d+-slim-\w+$", text, flags=re.MULTILINE)  # pinned
    assert re.search(r"^EXPOSE .*\b10809\b.*\b9109\b", text, flags=re.MULTILINE)
    user = re.search(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert user and user.group(1) not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT (.+)$", text, flags=re.MULTILINE)
    assert entry
    (entrypoint,) = json.loads(entry.group(1))
    source = dockerfile_copies()[f"/usr/local/bin/{entrypoint}"]
    assert (ROOT / source).stat().st_mode & 0o111  # COPY keeps the mode: it must be executable
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'exec nbdguard "$@"' in (ROOT / source).read_text() and "nbdguard" in scripts


def test_dockerfile_health_check_reads_the_config_not_a_port() -> None:
    text = (ROOT / "Dockerfile").read_text()
    check = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (.+)$", text, flags=re.MULTILINE)
    assert check, "no HEALTHCHECK ... CMD"
    command = json.loads(check.group(1))
    assert not re.search(r"\b\d{4,5}\b", check.group(1)), "the port comes from the config"
    assert dockerfile_copies()[command[-1]] == "deploy/docker/healthcheck.py"
    config = re.search(r"^ENV NBDGUARD_CONFIG=(\S+)$", text, flags=re.MULTILINE)
    assert config and config.group(1) == "/etc/nbdguard/nbdguard.toml"


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    return services


def test_compose_publishes_on_loopback_only_and_pins_images() -> None:
    for name, service in compose_services().items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        if "image" in service:
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), service["image"]


def test_compose_serves_the_container_config() -> None:
    """nbdguard gets config/container.toml as $NBDGUARD_CONFIG, its listeners are the ones
    published, its images live in the mounted directory, Prometheus scrapes its metrics."""
    nbdguard = compose_services()["nbdguard"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nbdguard["volumes"]}
    assert mounts["/etc/nbdguard/nbdguard.toml"] == "./config/container.toml"
    assert dockerfile_copies()["/etc/nbdguard/nbdguard.toml"] == "config/container.toml"
    config = load_config(ROOT / "config" / "container.toml")
    assert config.server.metrics_listen is not None
    metrics_port = config.server.metrics_listen[1]
    nbd_ports = {int(str(a).rsplit(":", 1)[1]) for a in config.server.listen}
    published = {int(port.rsplit(":", 1)[1]) for port in nbdguard["ports"]}
    assert published == nbd_ports | {metrics_port}
    images = Path(next(target for target, host in mounts.items() if host == "./images"))
    assert config.exports and all(e.path.is_relative_to(images) for e in config.exports)
    scrape = yaml.safe_load((ROOT / "config/prometheus/prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"nbdguard:{metrics_port}"]


def test_compose_user_defaults_to_the_image_user() -> None:
    user = compose_services()["nbdguard"]["user"]
    found = re.fullmatch(r"\$\{NBDGUARD_UID:-(\d+)\}:\$\{NBDGUARD_GID:-(\d+)\}", user)
    assert found, user
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"useradd [^\n]*--uid (\d+) --gid (\d+)", dockerfile)
    gid = re.search(r"groupadd [^\n]*--gid (\d+)", dockerfile)
    assert uid and gid and (found.group(1), found.group(2)) == (uid[1], uid[2]) == (uid[1], gid[1])


def test_health_check_follows_metrics_listen(tmp_path: Path) -> None:
    """The health check asks the config's metrics address (a wildcard one through the
    loopback): 0 while the server is up, 1 once it is gone or without metrics_listen."""
    port = free_port()
    running = start_server(
        tmp_path / "srv", [ExportSpec("d", size=1 << 20)], metrics_listen=f"0.0.0.0:{port}"
    )
    check = [sys.executable, str(ROOT / "deploy/docker/healthcheck.py")]
    env = dict(os.environ, NBDGUARD_CONFIG=str(tmp_path / "srv" / "nbdguard.toml"))
    try:
        up = subprocess.run(check, env=env, capture_output=True, text=True, cwd=ROOT)
        assert up.returncode == 0 and f"127.0.0.1:{port}/healthz: 200 ok" in up.stdout, up
    finally:
        assert running.stop() == 0
    down = subprocess.run(check, env=env, capture_output=True, text=True, cwd=ROOT)
    assert down.returncode == 1 and "unhealthy" in down.stdout
    bare = tmp_path / "bare.toml"
    bare.write_text('[[exports]]\nname = "d"\npath = "d.raw"\nformat = "raw"\n')
    none = subprocess.run(
        check, env=dict(env, NBDGUARD_CONFIG=str(bare)), capture_output=True, text=True, cwd=ROOT
    )
    assert none.returncode == 1 and "no [server] metrics_listen" in none.stdout


@pytest.fixture
def entrypoint_sandbox() -> Iterator[Path]:
    """A world-readable directory holding the entrypoint and a fake `nbdguard` that prints
    its arguments (tmp_path is private to root, and the test runs it as nobody)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the entrypoint as another uid")
    directory = Path(tempfile.mkdtemp(prefix="nbdguard-entrypoint-"))
    try:
        directory.chmod(0o755)
        (directory / "bin").mkdir(mode=0o755)
        fake = directory / "bin" / "nbdguard"
        fake.write_text('#!/bin/sh\necho "nbdguard $*"\n')
        fake.chmod(0o755)
        shutil.copy(ROOT / "deploy/docker/entrypoint.sh", directory / "entrypoint.sh")
        (directory / "images").mkdir(mode=0o755)
        yield directory
    finally:
        shutil.rmtree(directory)


def entrypoint(sandbox: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint as uid/gid 65534, as a container started with that `user:`."""
    env = {
        "PATH": f"{sandbox}/bin:/usr/bin:/bin",
        "NBDGUARD_IMAGES": str(sandbox / "images"),
        "NBDGUARD_CONFIG": "/etc/nbdguard/nbdguard.toml",
    }
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            str(sandbox / "entrypoint.sh"),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_entrypoint_runs_nbdguard_when_the_images_are_usable(entrypoint_sandbox: Path) -> None:
    image = entrypoint_sandbox / "images" / "disk.raw"
    image.write_bytes(b"")
    os.chown(image, 65534, 65534)
    served = entrypoint(entrypoint_sandbox)
    assert served.returncode == 0 and not served.stderr, served.stderr
    assert served.stdout == "nbdguard serve --config /etc/nbdguard/nbdguard.toml\n"
    check = entrypoint(entrypoint_sandbox, "check-config", "/x.toml")
    assert check.stdout == "nbdguard check-config /x.toml\n"


def test_entrypoint_refuses_images_this_uid_cannot_read(entrypoint_sandbox: Path) -> None:
    image = entrypoint_sandbox / "images" / "disk.raw"
    image.write_bytes(b"")
    image.chmod(0o600)  # root's, as a bind mount of the host user's files
    refused = entrypoint(entrypoint_sandbox)
    assert refused.returncode == 1 and refused.stdout == ""
    assert str(image) in refused.stderr
    assert "NBDGUARD_UID=$(id -u)" in refused.stderr and "chown -R 65534:65534" in refused.stderr
    (entrypoint_sandbox / "images").chmod(0o700)
    refused = entrypoint(entrypoint_sandbox)
    assert refused.returncode == 1 and "cannot be read by uid 65534:65534" in refused.stderr


def test_entrypoint_warns_about_images_it_can_only_read(entrypoint_sandbox: Path) -> None:
    image = entrypoint_sandbox / "images" / "disk.raw"
    image.write_bytes(b"")
    image.chmod(0o644)
    served = entrypoint(entrypoint_sandbox)
    assert served.returncode == 0 and served.stdout.startswith("nbdguard serve")
    assert "read_only = true" in served.stderr and str(image) in served.stderr


SYSTEMD = ROOT / "deploy" / "systemd"
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
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


def test_install_system_refuses_to_run_as_another_user() -> None:
    """Without DESTDIR it changes the system: as a user it stops before touching anything."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the script as another uid")
    refused = subprocess.run(
        [*AS_NOBODY, "bash", str(INSTALL_SYSTEM)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert refused.returncode == 1 and "run it as root" in refused.stderr


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
    assert "nbdguard.socket" in service["Unit.Wants"][0].split()  # maskable: listen = [...]


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
    sender: int = 0  # the pid that sent the last message (SCM_CREDENTIALS)

    def message(self) -> set[str]:
        """The next datagram's fields (waits for it: the receiver has a timeout)."""
        try:
            data, ancillary, _, _ = self.receiver.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no notification\n{self.log.read_text()}") from None
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                self.sender = struct.unpack("iII", payload[:12])[0]
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
    tmp_path: Path, address: str, *, image: bool = True, wrapper: tuple[str, ...] = ()
) -> Iterator[NotifiedServer]:
    """`nbdguard serve` (under `wrapper`, if any) with NOTIFY_SOCKET naming a datagram
    socket this test reads, with the senders' credentials (systemd's NotifyAccess=main
    drops messages from any other pid than the service's)."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
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
            [*wrapper, sys.executable, "-m", "nbdguard", "serve", "--config", str(config)],
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
        assert server.sender == server.process.pid  # the main process: NotifyAccess=main
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
        assert server.sender == server.process.pid
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


def syscall_set(group: str) -> set[str]:
    """The system calls of a systemd syscall-filter group, nested groups expanded."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= syscall_set(word) if word.startswith("@") else {word}
    return names


@pytest.mark.interop
def test_server_fits_the_service_syscall_filter_and_address_families(tmp_path: Path) -> None:
    """Under strace, a served session (writes, reads large enough for sendfile, trim, zero,
    flush, FUA, block status, a scrape, a reload, the stop) uses only calls in the unit's
    SystemCallFilter and only the socket families of its RestrictAddressFamilies."""
    require("strace", "systemd-analyze", "qemu-io", "nbdinfo")
    if subprocess.run(["strace", "-o", os.devnull, "true"], check=False).returncode != 0:
        pytest.skip("strace cannot trace here (ptrace not permitted)")
    service = unit_settings(SYSTEMD / "nbdguard.service")
    (group,) = service["Service.SystemCallFilter"]
    families = set(service["Service.RestrictAddressFamilies"][0].split())
    trace = tmp_path / "strace.txt"
    strace = ("strace", "-f", "-C", "-qq", "-o", str(trace))
    with notified_server(tmp_path, str(tmp_path / "notify"), wrapper=strace) as server:
        assert "READY=1" in server.message()
        uri = f"nbd+unix:///d?socket={tmp_path / 'nbd.sock'}"
        io = [
            "write -P 0xab 0 512k",
            "read -P 0xab 0 512k",
            "read 0 4k",
            "discard 512k 64k",
            "write -z 576k 64k",
            "flush",
            "write -f 0 4k",
        ]
        run("qemu-io", "-f", "raw", *(arg for c in io for arg in ("-c", c)), uri)
        run("nbdinfo", "--map", uri)
        assert server.health() == 200
        os.kill(server.sender, signal.SIGHUP)
        assert "RELOADING=1" in server.message() and "READY=1" in server.message()
        os.kill(server.sender, signal.SIGTERM)
        assert "STOPPING=1" in server.message()
        assert server.process.wait(timeout=60) == 0, server.log.read_text()
    text = trace.read_text()
    summary = text[text.index("% time") :].splitlines()
    used = {words[-1] for words in map(str.split, summary) if words and words[0][0].isdigit()}
    used.discard("total")
    assert {"sendfile", "fdatasync", "fallocate", "pwrite64"} <= used  # the session ran
    assert used - syscall_set(group) == set()
    assert set(re.findall(r"socket\((AF_\w+)", text)) <= families
