"""The operator HTTP endpoint as an attacker sees it: half-open connections, resets during
a reply, malformed requests and scrape storms must not reach the NBD side, nor stderr."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from nbdguard.observability.http import HttpLimits, OperatorEndpoint, parse_head
from nbdguard.observability.metrics import Metrics
from tests.interop.conftest import ExportSpec, RunningServer, sample, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop

PATTERN = bytes(range(256)) * 16  # 4 KiB at offset 0 of vm1
CAP = HttpLimits().max_connections
REQUEST_TIMEOUT = HttpLimits().request_timeout


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_server(
        tmp_path / "srv", [ExportSpec("vm1", size=8 << 20, fill=PATTERN)], metrics=True
    )
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


def events(server: RunningServer, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [event for event in lines if event["event"] == name]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    """Poll an external condition (a log line, a /proc count) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape_when_admitted(server: RunningServer, timeout: float) -> str:
    """/metrics once the endpoint admits connections again (refusals are resets)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, text = server.scrape()
            assert status == 200
            return text
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def nbd_read(server: RunningServer, transport: str) -> bytes:
    h = nbd.NBD()
    try:
        h.connect_uri(server.uri("vm1", transport))
        data = bytes(h.pread(4096, 0))
        h.shutdown()
        return data
    finally:
        del h


def test_half_open_http_connections_cannot_starve_nbd(observed: RunningServer) -> None:
    pid = observed.process.pid
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    baseline = open_fds(pid)
    started = time.monotonic()
    attackers: list[socket.socket] = []
    try:
        for i in range(1000):
            conn = socket.create_connection(("127.0.0.1", observed.metrics_port), timeout=10)
            if i % 2:
                conn.sendall(b"GET /metr")  # half a request line; the rest never comes
            attackers.append(conn)
        # The server closes what is beyond its cap at once: its descriptors stay bounded
        # while the admitted ones are still waiting for their request.
        bound = baseline + CAP + 8
        wait_for(lambda: open_fds(pid) <= bound, REQUEST_TIMEOUT - 1, f"<= {bound} fds")
        assert nbd_read(observed, "tcp") == PATTERN
        assert nbd_read(observed, "unix") == PATTERN
        text = scrape_when_admitted(observed, timeout=REQUEST_TIMEOUT + 10)
        assert open_fds(pid) <= bound
    finally:
        for conn in attackers:
            conn.close()
    # Each attacker was refused at once or admitted and timed out; fewer than CAP may still
    # be admitted when the scrape got in. (More than CAP time out when the 1000 connects
    # take longer than the request deadline on a loaded machine.)
    timed_out = sample(text, "nbdguard_http_errors_total", reason="timeout") or 0
    refused = sample(text, "nbdguard_http_connections_refused_total") or 0
    assert timed_out >= CAP
    assert refused + timed_out >= 1000 - CAP
    assert observed.stop() == 0
    # Rate-limited (a burst, its refill, a fresh burst after each periodic summary), and
    # nothing lost: lines let through plus the suppressed counts.
    limits = HttpLimits()
    periods = (time.monotonic() - started) / limits.log_interval
    lines = events(observed, "http.refused")
    assert 0 < len(lines) <= limits.log_burst * (2 + 2 * periods)
    summaries = [
        e for e in events(observed, "log.suppressed") if e["suppressed_event"] == "http.refused"
    ]
    assert len(lines) + sum(e["count"] for e in summaries) >= refused


def _reset(conn: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_reset_during_a_reply_is_an_event_not_a_traceback(tmp_path: Path) -> None:
    # 24 exports make an exposition far larger than what the kernel buffers hold
    # for a peer that reads nothing, so the server is still writing when the RST comes.
    exports = [ExportSpec(f"e{i}", size=1 << 20) for i in range(24)]
    server = start_server(tmp_path / "srv", exports, metrics=True)
    try:
        _, text = server.scrape()
        assert len(text) > 4 * HttpLimits().send_buffer  # the kernel doubles SO_SNDBUF
        conn = socket.socket()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        conn.connect(("127.0.0.1", server.metrics_port))
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: nbdguard\r\n\r\n")
        assert conn.recv(1) == b"H"  # the reply has started
        _reset(conn)
        wait_for(
            lambda: any(e["reason"] == "reset" for e in events(server, "http.error")),
            10,
            "an http.error event",
        )
        [event] = [e for e in events(server, "http.error") if e["reason"] == "reset"]
        assert event["peer"].startswith("127.0.0.1:") and event["level"] == "info"
        with socket.create_connection(("127.0.0.1", server.metrics_port)) as bad:
            bad.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            assert bad.recv(64).startswith(b"HTTP/1.1 400 ")
        for _ in range(20):  # errors replies cut short, requests cut short
            with socket.create_connection(("127.0.0.1", server.metrics_port)) as conn:
                conn.sendall(b"BOGUS\r\n\r\n")
                _reset(conn)
            with socket.create_connection(("127.0.0.1", server.metrics_port)) as conn:
                conn.sendall(b"GET /metrics HTT")
                _reset(conn)
        text = scrape_when_admitted(server, timeout=10)
        assert (sample(text, "nbdguard_http_errors_total", reason="reset") or 0) >= 1
        assert (sample(text, "nbdguard_http_errors_total", reason="malformed") or 0) >= 1
        assert server.scrape("/healthz") == (200, "ok\n")
    finally:
        code = server.stop()
    log = server.log()
    assert code == 0, log
    assert "Traceback" not in log
    assert all(line.startswith("{") for line in log.splitlines()), log


STORM = """
import sys, threading, urllib.request
stop = threading.Event()
count = [0] * 8
def scrape(i):
    while not stop.is_set():
        try:
            urllib.request.urlopen(sys.argv[1], timeout=10).read()
            count[i] += 1
        except OSError:
            pass
        if count[i] == 1 and all(count):
            print("ready", flush=True)
threads = [threading.Thread(target=scrape, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
print(sum(count), flush=True)
"""


def read_latencies(h: Any, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        h.pread(4096, (i % 2048) * 4096)
        latencies.append(time.perf_counter() - started)
    return sorted(latencies)


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))]


def test_scrape_storm_keeps_nbd_reads_fast(observed: RunningServer) -> None:
    h = nbd.NBD()
    h.connect_uri(observed.uri("vm1"))
    read_latencies(h, 200)  # warm up
    quiet = read_latencies(h, 3000)
    url = f"http://127.0.0.1:{observed.metrics_port}/metrics"
    storm = subprocess.Popen(
        [sys.executable, "-c", STORM, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert storm.stdout is not None and storm.stdin is not None
        assert storm.stdout.readline() == "ready\n"
        # Three windows: the first includes the storm's start (its exposition burst, the
        # scrapers' own start-up on a shared machine), the others its steady state.
        stormy = [read_latencies(h, 3000) for _ in range(3)]
        storm.stdin.close()
        scrapes = int(storm.stdout.readline())
    finally:
        storm.kill()
        storm.wait()
    h.shutdown()
    windows = ", ".join(
        f"p50 {percentile(w, 0.5) * 1e3:.3f} p99 {percentile(w, 0.99) * 1e3:.3f}" for w in stormy
    )
    print(
        f"\nNBD 4 KiB read latency (ms): quiet p50 {percentile(quiet, 0.5) * 1e3:.3f} "
        f"p99 {percentile(quiet, 0.99) * 1e3:.3f}; during the storm {windows} "
        f"({scrapes} scrapes)"
    )
    assert scrapes >= 8
    assert all(percentile(w, 0.99) < 0.050 for w in stormy)


# -- the endpoint in-process: what the interop tests cannot see ------------------------


class SlowCollector:
    """An exposition that takes `delay` seconds (GIL released), counted."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    def collect(self) -> Iterable[Metric]:
        self.calls += 1
        time.sleep(self.delay)
        family = GaugeMetricFamily("slow_value", "A value that takes time.")
        family.add_metric([], self.calls)
        yield family


def get(port: int, path: str = "/metrics") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_concurrent_scrapes_share_one_exposition() -> None:
    metrics = Metrics()
    slow = SlowCollector(0.3)
    metrics.registry.register(slow)
    slow.calls = 0
    endpoint = OperatorEndpoint(
        "127.0.0.1", 0, metrics, lambda: (True, "ok"), HttpLimits(exposition_duty=1.0)
    )
    try:
        results: list[tuple[int, bytes]] = []
        barrier = threading.Barrier(16)

        def scrape() -> None:
            barrier.wait()
            results.append(get(endpoint.port))

        threads = [threading.Thread(target=scrape) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [status for status, _ in results] == [200] * 16
        assert b"slow_value" in results[0][1]
        assert slow.calls <= 2  # one running when the first came, one for the rest
        # A scrape after those never sees numbers older than itself.
        _, body = get(endpoint.port)
        assert f"slow_value {float(slow.calls)}".encode() in body
        assert get(endpoint.port, "/healthz") == (200, b"ok\n")
        assert get(endpoint.port, "/nothing")[0] == 404
        assert get(endpoint.port, "/")[0] == 404  # /metrics and /healthz only
    finally:
        endpoint.close()


def test_expositions_are_paced_to_their_duty() -> None:
    metrics = Metrics()
    slow = SlowCollector(0.05)
    metrics.registry.register(slow)
    slow.calls = 0
    limits = HttpLimits(exposition_duty=0.25, exposition_burst=0.05)
    endpoint = OperatorEndpoint("127.0.0.1", 0, metrics, lambda: (True, "ok"), limits)
    try:
        started = time.monotonic()
        for _ in range(6):
            assert get(endpoint.port)[0] == 200
        elapsed = time.monotonic() - started
        # The sixth starts once 5 x 0.05 s spent, less 0.05 s saved, are earned at 25 %.
        assert elapsed >= (5 * 0.05 - 0.05) / 0.25 * 0.9
    finally:
        endpoint.close()


@pytest.mark.parametrize(
    "head",
    [b"GET\r\n\r\n", b"GET / FTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nno colon\r\n\r\n"],
)
def test_malformed_heads_are_refused(head: bytes) -> None:
    from nbdguard.observability.http import MalformedRequest

    with pytest.raises(MalformedRequest):
        parse_head(head)


def test_heads_are_parsed() -> None:
    request = parse_head(b"GET /metrics?name[]=a HTTP/1.1\r\nAccept: text/plain\r\n\r\n")
    assert (request.method, request.path) == ("GET", "/metrics")
    assert request.query == {"name[]": ["a"]}
    assert request.headers == {"accept": "text/plain"}


class BigCollector:
    """An exposition of about 1 MB."""

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("big_value", "Many samples.", labels=["n"])
        for n in range(20000):
            family.add_metric([f"{n:020d}"], n)
        yield family


class BrokenCollector:
    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("collector bug")


def errors(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("nbdguard_http_errors_total", {"reason": reason})
    return value or 0.0


def endpoint_with(*collectors: Any, **limits: Any) -> tuple[Metrics, OperatorEndpoint]:
    metrics = Metrics()
    for collector in collectors:
        metrics.registry.register(collector)
    limits.setdefault("exposition_duty", 1.0)
    return metrics, OperatorEndpoint(
        "127.0.0.1", 0, metrics, lambda: (True, "ok"), HttpLimits(**limits)
    )


def test_cap_request_deadline_and_write_timeout() -> None:
    metrics, endpoint = endpoint_with(
        BigCollector(), max_connections=2, request_timeout=2.0, write_timeout=0.5
    )
    address = ("127.0.0.1", endpoint.port)
    try:
        idle = [socket.create_connection(address) for _ in range(2)]
        wait_for(lambda: endpoint.active == 2, 5, "two connections admitted")
        with (
            socket.create_connection(address, timeout=5) as third,
            contextlib.suppress(ConnectionResetError),
        ):
            assert third.recv(1) == b""
        assert metrics.registry.get_sample_value("nbdguard_http_connections_refused_total") == 1
        assert errors(metrics, "timeout") == 0  # closed at once, not at a deadline
        for conn in idle:  # the request deadline closes them
            conn.settimeout(5)
            assert conn.recv(1) == b""
            conn.close()
        assert errors(metrics, "timeout") == 2
        # A peer that asks for a big reply and never reads it loses it after write_timeout.
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        reader.connect(address)
        reader.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_for(lambda: errors(metrics, "write_timeout") == 1, 10, "a write timeout")
        reader.close()
        wait_for(lambda: endpoint.active == 0, 5, "every connection closed")
    finally:
        endpoint.close()


def test_a_failing_collector_is_a_500_and_an_event() -> None:
    metrics, endpoint = endpoint_with(BrokenCollector())
    try:
        status, body = get(endpoint.port)
        assert status == 500 and b"RuntimeError" in body
        assert errors(metrics, "exposition_failed") == 1
        assert get(endpoint.port, "/healthz") == (200, b"ok\n")
    finally:
        endpoint.close()


def test_close_right_after_start_is_prompt() -> None:
    started = time.monotonic()
    endpoint = OperatorEndpoint("127.0.0.1", 0, Metrics(), lambda: (True, "ok"))
    endpoint.close()
    assert time.monotonic() - started < 4  # close() gives up on the thread after 5 s
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", endpoint.port), timeout=2)


def test_formats_compression_and_head_are_kept() -> None:
    metrics, endpoint = endpoint_with()
    base = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        accept = {
            "Accept": "application/openmetrics-text; version=1.0.0",
            "Accept-Encoding": "gzip",
        }
        request = urllib.request.Request(base, headers=accept)
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert response.headers["Content-Encoding"] == "gzip"
            text = gzip.decompress(response.read()).decode()
        assert "nbdguard_build_info" in text and text.endswith("# EOF\n")
        request = urllib.request.Request(base + "?name[]=nbdguard_build_info", method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert int(response.headers["Content-Length"]) > 0 and response.read() == b""
        _, body = get(endpoint.port, "/metrics?name[]=nbdguard_build_info")
        assert body.startswith(b"# HELP nbdguard_build_info")
        assert b"nbdguard_connections" not in body
    finally:
        endpoint.close()
    if socket.has_ipv6:
        try:
            six = OperatorEndpoint("::1", 0, metrics, lambda: (True, "ok"))
        except OSError:
            return  # no IPv6 loopback here
        try:
            with urllib.request.urlopen(f"http://[::1]:{six.port}/healthz", timeout=10) as r:
                assert r.read() == b"ok\n"
        finally:
            six.close()
