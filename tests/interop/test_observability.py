"""Metrics, /healthz and logs as an operator sees them, scraped by a real Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guard.samples import QEMU_HEADERS
from tests.interop.conftest import (
    ExportSpec,
    RunningServer,
    free_port,
    sample,
    start_server,
    write_config,
)

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape can contain, including ones with no samples yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
            }.get(kind, ())
            names.update(name + suffix for suffix in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_server(
        tmp_path / "srv",
        [ExportSpec("vm1", size=8 << 20), ExportSpec("ro", size=1 << 20, read_only=True)],
        metrics=True,
    )
    yield server
    assert server.stop() == 0, server.log()


def events(server: RunningServer) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def test_healthz_and_request_metrics(observed: RunningServer) -> None:
    assert observed.scrape("/healthz") == (200, "ok\n")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(observed.uri("vm1"))
    h.pwrite(b"m" * 4096, 0)
    h.pread(8192, 0)
    h.flush()
    with pytest.raises(nbd.Error):
        h.pread(512, 8 << 20)
    status, text = observed.scrape()
    assert status == 200
    assert sample(text, "nbdguard_connections", export="vm1") == 1
    h.shutdown()
    time.sleep(0.2)
    _, text = observed.scrape()
    assert sample(text, "nbdguard_connections", export="vm1") == 0
    assert sample(text, "nbdguard_connections_opened_total", export="vm1") == 1
    assert sample(text, "nbdguard_requests_total", export="vm1", command="write") == 1
    assert sample(text, "nbdguard_requests_total", export="vm1", command="read") == 2
    assert sample(text, "nbdguard_requests_total", export="vm1", command="flush") == 1
    assert sample(text, "nbdguard_read_bytes_total", export="vm1") == 8192
    assert sample(text, "nbdguard_written_bytes_total", export="vm1") == 4096
    assert (
        sample(text, "nbdguard_request_errors_total", export="vm1", command="read", errno="22") == 1
    )
    assert (
        sample(text, "nbdguard_request_duration_seconds_count", export="vm1", command="read") == 2
    )
    assert (
        sample(
            text,
            "nbdguard_request_duration_seconds_bucket",
            export="vm1",
            command="read",
            le="1e-05",
        )
        is not None
    )
    assert sample(text, "nbdguard_requests_in_flight", export="vm1") == 0
    assert sample(text, "nbdguard_export_size_bytes", export="vm1") == 8 << 20
    assert (
        sample(
            text,
            "nbdguard_export_info",
            export="ro",
            format="raw",
            read_only="true",
            header_guard="qemu",
        )
        == 1
    )
    assert sample(text, "nbdguard_export_up", export="vm1") == 1
    assert sample(text, "nbdguard_build_info") == 1


def test_handshake_failures_are_counted_and_logged(observed: RunningServer) -> None:
    before = _wait_for_probe(observed)
    probes = sample(before, "nbdguard_handshake_failures_total", reason="disconnected") or 0
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(observed.socket_path))
        raw.recv(18)
        raw.sendall(struct.pack(">I", 3) + b"garbage!" * 2)
        raw.recv(100)
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(observed.socket_path))
        raw.recv(18)
    _wait_for(observed, "nbdguard_handshake_failures_total", 1, reason="bad_option_magic")
    text = _wait_for(
        observed, "nbdguard_handshake_failures_total", probes + 1, reason="disconnected"
    )
    assert sample(text, "nbdguard_handshakes_total", outcome="failed") == probes + 2
    assert sample(text, "nbdguard_handshake_failures_total", reason="disconnected") == probes + 1
    failed = [e for e in events(observed) if e["event"] == "handshake.failed"]
    assert {e["reason_code"] for e in failed} == {"bad_option_magic", "disconnected"}
    assert all(e["conn"] and e["client"] and e["level"] in ("info", "warning") for e in failed)


def test_json_logs_carry_context_and_no_per_request_lines(observed: RunningServer) -> None:
    h = nbd.NBD()
    h.connect_uri(observed.uri("vm1"))
    for _ in range(20):
        h.pread(512, 0)
    assert_refused = False
    try:
        h.pwrite(QEMU_HEADERS["qcow2"], 0)
    except nbd.Error:
        assert_refused = True
    assert assert_refused
    h.shutdown()
    time.sleep(0.2)
    logged = events(observed)
    by_event = {e["event"]: e for e in logged}
    for name in ("connection.ready", "connection.closed", "guard.header_write_blocked"):
        event = by_event[name]
        assert event["export"] == "vm1" and event["client"] and event["conn"], event
        assert event["timestamp"] and event["level"]
    assert "request.done" not in by_event  # INFO must not log every request


def test_debug_level_logs_every_request(tmp_path: Path) -> None:
    server = start_server(tmp_path / "dbg", [ExportSpec("vm1", size=1 << 20)], log_level="debug")
    h = nbd.NBD()
    h.connect_uri(server.uri("vm1"))
    for offset in range(0, 5 * 512, 512):
        h.pread(512, offset)
    h.shutdown()
    assert server.stop() == 0
    done = [e for e in events(server) if e["event"] == "request.done"]
    assert [e["offset"] for e in done if e["command"] == "read"] == list(range(0, 2560, 512))


def test_real_prometheus_scrapes_a_blocked_write(observed: RunningServer, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus)")
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: nbdguard\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{observed.metrics_port}']\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    vmdk = 'nbdguard_header_writes_blocked_total{export="vm1",format="vmdk",command="write"}'
    try:
        # exposed at 0 before any write, so the alert's increase() sees the first one
        [zero] = _query_until(prom_port, vmdk, deadline=60)
        assert float(zero["value"][1]) == 0
        h = nbd.NBD()
        h.connect_uri(observed.uri("vm1"))
        with pytest.raises(nbd.Error):
            h.pwrite(QEMU_HEADERS["vmdk"], 0)
        h.shutdown()
        query = "increase(nbdguard_header_writes_blocked_total[1m]) > 0"
        result = _query_until(prom_port, query, deadline=60)
    finally:
        process.terminate()
        process.wait(timeout=20)
    [series] = result
    assert series["metric"]["export"] == "vm1"
    assert series["metric"]["format"] == "vmdk"
    assert series["metric"]["command"] == "write"
    assert float(series["value"][1]) > 0  # extrapolated over the window


def _query_until(port: int, query: str, deadline: float) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
            if body["status"] == "success" and body["data"]["result"]:
                return list(body["data"]["result"])
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never returned {query}")


def test_exposed_names_include_histograms(observed: RunningServer) -> None:
    _, text = observed.scrape()
    names = exposed_names(text)
    assert "nbdguard_request_duration_seconds_bucket" in names
    assert "nbdguard_chain_refused_total" in names  # declared even before any refusal


def _wait_for_probe(server: RunningServer) -> str:
    """start_server's readiness probe connected and left: wait until it is counted, or it
    may land in the middle of a test on a loaded machine. Returns that scrape."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, text = server.scrape()
        if sample(text, "nbdguard_handshake_failures_total", reason="disconnected"):
            return text
        time.sleep(0.05)
    raise AssertionError("the readiness probe was never counted")


def _wait_for(server: RunningServer, name: str, value: float, **labels: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, text = server.scrape()
        if sample(text, name, **labels) == value:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {value}")


def test_listing_and_aborting_are_outcomes_not_failures(observed: RunningServer) -> None:
    nbdinfo = shutil.which("nbdinfo")
    if nbdinfo is None:
        pytest.skip("nbdinfo is not installed (Debian package libnbd-bin)")
    before = _wait_for_probe(observed)
    failures = {
        line.split(" ")[0] + " " + line.rsplit(" ", 1)[1]
        for line in before.splitlines()
        if line.startswith("nbdguard_handshake_failures_total{")
    }
    listing = subprocess.run(
        [nbdinfo, "--list", observed.uri("")], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert "vm1" in listing.stdout and "ro" in listing.stdout
    with socket.socket(socket.AF_UNIX) as raw:  # a bare NBD_OPT_ABORT
        raw.connect(str(observed.socket_path))
        raw.recv(18)
        raw.sendall(struct.pack(">IQII", 3, 0x49484156454F5054, 2, 0))
        raw.recv(100)
    _wait_for(observed, "nbdguard_handshakes_total", 1, outcome="list")
    text = _wait_for(observed, "nbdguard_handshakes_total", 1, outcome="aborted")
    assert sample(text, "nbdguard_handshakes_total", outcome="list") == 1
    assert sample(text, "nbdguard_handshakes_total", outcome="failed") == 1  # the probe
    after = {
        line.split(" ")[0] + " " + line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith("nbdguard_handshake_failures_total{")
    }
    assert after == failures  # no failure reason moved
    h = nbd.NBD()
    h.connect_uri(observed.uri("vm1"))
    h.shutdown()
    text = _wait_for(observed, "nbdguard_handshakes_total", 1, outcome="transmission")
    assert sample(text, "nbdguard_handshakes_total", outcome="failed") == 1


def test_existing_header_gauge_has_one_series_per_export(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "hdr",
        [
            ExportSpec("plain", size=1 << 20),
            ExportSpec(
                "misdeclared",
                size=1 << 20,
                fill=QEMU_HEADERS["qcow2"],
                extra={"on_existing_header": "warn"},
            ),
            ExportSpec(
                "refused",
                size=1 << 20,
                fill=QEMU_HEADERS["vmdk"],
                extra={"on_existing_header": "refuse"},
            ),
        ],
        metrics=True,
    )
    try:
        _, text = server.scrape()
    finally:
        assert server.stop() == 0, server.log()
    lines = [
        line for line in text.splitlines() if line.startswith("nbdguard_export_existing_header{")
    ]
    assert len(lines) == 2, lines
    assert sample(text, "nbdguard_export_existing_header", export="plain", format="none") == 0
    # refused at open: what sector 0 holds is in the log, and the export is down
    assert sample(text, "nbdguard_export_existing_header", export="refused") is None
    assert sample(text, "nbdguard_export_up", export="refused") == 0
    assert (
        sample(text, "nbdguard_export_existing_header", export="misdeclared", format="qcow2") == 1
    )


def test_an_export_removed_and_added_back_keeps_single_series(tmp_path: Path) -> None:
    """Two ExportMetrics for one name would expose every request series twice, which
    Prometheus rejects (the whole scrape fails)."""
    from tests.interop.test_reload import hangup, reconfigure

    a, b = ExportSpec("a", size=1 << 20), ExportSpec("b", size=1 << 20)
    server = start_server(tmp_path / "srv", [a, b], metrics=True)
    metrics_listen = {"metrics_listen": f"127.0.0.1:{server.metrics_port}"}
    try:
        h = nbd.NBD()
        h.connect_uri(server.uri("b"))
        h.pread(512, 0)
        h.shutdown()
        for exports in ([a], [a, b]):
            reconfigure(server, exports)
            write_config(server.directory, exports, server.port, **metrics_listen)
            hangup(server, "config.reloaded")
        _, text = server.scrape()
    finally:
        assert server.stop() == 0, server.log()
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line[:1] not in "#"]
    duplicates = {line for line in series if series.count(line) > 1}
    assert not duplicates, sorted(duplicates)[:5]
    assert sample(text, "nbdguard_requests_total", export="b", command="read") == 1  # kept
    assert sample(text, "nbdguard_export_up", export="b") == 1
