"""Start a real nbdguard process with a temporary config, for real clients to drive."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def require(*tools: str) -> None:
    """Skip (with the reason) when a client binary is missing; CI installs them all."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ExportSpec:
    name: str
    size: int = 64 << 20
    read_only: bool = False
    fill: bytes = b""  # written at offset 0 before the server starts
    extra: dict[str, object] = field(default_factory=dict)
    image: Path | None = None  # an existing image to serve; None: create NAME.raw of `size`
    format: str = "raw"

    def image_path(self, directory: Path) -> Path:
        return self.image or directory / f"{self.name or 'default'}.raw"


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    directory: Path
    socket_path: Path
    port: int
    images: dict[str, Path]
    log_path: Path
    metrics_port: int = 0  # 0: started without metrics_listen

    def uri(self, export: str, transport: str = "unix") -> str:
        """An NBD URI understood by libnbd tools and by qemu."""
        if transport == "unix":
            return f"nbd+unix:///{export}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        return self.log_path.read_text()

    def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        """HTTP status and body from the metrics endpoint (start_server(metrics=True))."""
        assert self.metrics_port, "started without metrics"
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample from a fresh scrape (see `sample`)."""
        return sample(self.scrape()[1], name, **labels)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, matched on a subset of labels."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def write_config(directory: Path, exports: list[ExportSpec], port: int, **server: object) -> Path:
    lines = [
        "[server]",
        f'listen = ["unix://{directory}/nbd.sock", "tcp://127.0.0.1:{port}"]',
        'log_format = "json"',
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in server.items()]
    for spec in exports:
        lines += [
            "",
            "[[exports]]",
            f"name = {_toml_value(spec.name)}",
            f"path = {_toml_value(str(spec.image_path(directory)))}",
            f"format = {_toml_value(spec.format)}",
            f"read_only = {_toml_value(spec.read_only)}",
            f"description = {_toml_value('test export ' + spec.name)}",
        ]
        lines += [f"{key} = {_toml_value(value)}" for key, value in spec.extra.items()]
    path = directory / "nbdguard.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(
    directory: Path, exports: list[ExportSpec], *, metrics: bool = False, **server: object
) -> RunningServer:
    """Start nbdguard on a Unix socket and a TCP port (plus a metrics endpoint if asked);
    extra keyword arguments become [server] keys."""
    directory.mkdir(parents=True, exist_ok=True)
    metrics_port = free_port() if metrics else 0
    if metrics:
        server["metrics_listen"] = f"127.0.0.1:{metrics_port}"
    images = {}
    for spec in exports:
        image = spec.image_path(directory)
        if spec.image is None:
            with open(image, "wb") as handle:
                handle.truncate(spec.size)
                handle.write(spec.fill)
        images[spec.name] = image
    port = free_port()
    config = write_config(directory, exports, port, **server)
    log_path = directory / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "nbdguard", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    running = RunningServer(
        process, directory, directory / "nbd.sock", port, images, log_path, metrics_port
    )
    _wait_ready(running)
    return running


def _wait_ready(server: RunningServer, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"nbdguard exited early:\n{server.log()}")
        if server.socket_path.exists():
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=1):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"nbdguard did not start:\n{server.log()}")


DEFAULT_EXPORTS = [
    ExportSpec("vm1"),
    ExportSpec("ro", size=1 << 20, read_only=True, fill=b"\x5a" * 4096),
    ExportSpec("odd", size=1000),
    ExportSpec("", size=1 << 20),
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path / "srv", DEFAULT_EXPORTS)
    yield running
    code = running.stop()
    assert code == 0, running.log()


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(
    *command: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # nbdsh runs `python3 -m nbd`: the system interpreter must come first on PATH, since
    # python3-libnbd is built for it (a pyenv or venv python3 cannot import it).
    env = dict(os.environ, PATH=f"/usr/bin:{os.environ.get('PATH', '')}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result
