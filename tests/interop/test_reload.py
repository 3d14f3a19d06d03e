"""SIGHUP reloads the export list of a running server, with real clients attached."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, RunningServer, require, start_server, write_config

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.interop


def listed(server: RunningServer) -> set[str]:
    result = subprocess.run(
        ["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={server.socket_path}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {export["export-name"] for export in json.loads(result.stdout)["exports"]}


def hangup(server: RunningServer, event: str) -> dict[str, object]:
    """Send SIGHUP and return the next `event` log line it produced."""
    seen = server.log().count(f'"{event}"')
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in server.log().splitlines() if f'"{event}"' in line]
        if len(lines) > seen:
            record: dict[str, object] = json.loads(lines[-1])
            return record
        time.sleep(0.05)
    raise AssertionError(f"no {event} after SIGHUP:\n{server.log()}")


def reconfigure(server: RunningServer, specs: list[ExportSpec]) -> None:
    for spec in specs:
        image = spec.image_path(server.directory)
        if not image.exists():
            with open(image, "wb") as handle:
                handle.truncate(spec.size)
    write_config(server.directory, specs, server.port)


def connect(server: RunningServer, export: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.connect_uri(server.uri(export))
    return handle


LAN = {"allow_addresses": ["10.0.0.0/8"]}
_ERRORS = "nbdguard_request_errors_total"


def connect_tcp(server: RunningServer, export: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.connect_uri(server.uri(export, "tcp"))
    return handle


def test_reload_adds_removes_and_keeps_exports(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-io")
    a, b, c = ExportSpec("a", size=1 << 20), ExportSpec("b", size=1 << 20), ExportSpec("c")
    server = start_server(tmp_path / "srv", [a, b])
    try:
        kept = connect(server, "b")
        leaving = connect(server, "a")
        kept.pwrite(b"\x11" * 512, 0)
        reconfigure(server, [b, c])
        record = hangup(server, "config.reloaded")
        assert record["added"] == ["c"] and record["removed"] == ["a"] and record["kept"] == ["b"]
        assert listed(server) == {"b", "c"}
        assert kept.pread(512, 0) == b"\x11" * 512  # the unchanged export kept its client
        leaving.pwrite(b"\x22" * 512, 0)  # a removed export serves its clients to the end...
        with pytest.raises(nbd.Error):
            connect(server, "a")  # ...but takes no new ones
        image_a = server.images["a"]
        locked = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 512", str(image_a)], capture_output=True
        )
        assert locked.returncode != 0  # still held while its client is connected
        leaving.shutdown()
        del leaving
        deadline = time.monotonic() + 10
        while subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image_a)],
                             capture_output=True).returncode:  # fmt: skip
            assert time.monotonic() < deadline, "the removed export never released its image"
            time.sleep(0.1)
        new = connect(server, "c")
        assert new.get_size() == c.size
        new.shutdown()
        kept.shutdown()
    finally:
        assert server.stop() == 0


def test_an_invalid_config_changes_nothing(tmp_path: Path) -> None:
    require("nbdinfo")
    server = start_server(tmp_path / "srv", [ExportSpec("a", size=1 << 20)])
    try:
        config = server.directory / "nbdguard.toml"
        good = config.read_text()
        config.write_text(good + '\n[[exports]]\nname = "broken"\nformat = "vmdk"\n')
        record = hangup(server, "config.reload_failed")
        problems = record["problems"]
        assert isinstance(problems, list) and any('"path": is required' in p for p in problems)
        assert listed(server) == {"a"}
    finally:
        assert server.stop() == 0


def test_a_refused_export_is_tried_again_on_reload(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-img")
    top = tmp_path / "srv" / "top.qcow2"
    top.parent.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(outside / "base.raw"), "1M"])
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(outside / "base.raw"), "-F", "raw",
         str(top)], check=True,
    )  # fmt: skip
    specs = [ExportSpec("a", size=1 << 20), ExportSpec("vm", image=top, format="qcow2")]
    server = start_server(tmp_path / "srv", specs, metrics=True)
    try:
        assert listed(server) == {"a"}
        assert server.scrape("/healthz")[0] == 503
        specs[1].extra["allow_dirs"] = [str(outside)]
        reconfigure(server, specs)
        record = hangup(server, "config.reloaded")
        assert record["added"] == ["vm"]
        assert listed(server) == {"a", "vm"}
        assert server.scrape("/healthz")[0] == 200
    finally:
        assert server.stop() == 0


def test_a_changed_export_keeps_its_definition_while_served(tmp_path: Path) -> None:
    require("nbdinfo")
    server = start_server(tmp_path / "srv", [ExportSpec("a", size=1 << 20, read_only=True)])
    try:
        # a device opened read-only cannot start taking writes without a reopen
        reconfigure(server, [ExportSpec("a", size=1 << 20)])
        record = hangup(server, "config.export_changed")
        assert record["exports"] == ["a"]
        handle = connect(server, "a")
        assert handle.is_read_only()
        handle.shutdown()
        # a guard setting needs a reopen too, and then nothing of the change applies
        mixed = {**LAN, "header_guard": "strict"}
        reconfigure(server, [ExportSpec("a", size=1 << 20, read_only=True, extra=mixed)])
        record = hangup(server, "config.export_changed")
        assert record["exports"] == ["a"]
        connect_tcp(server, "a").shutdown()  # allow_addresses was not applied either
    finally:
        assert server.stop() == 0
    assert '"config.access_changed"' not in server.log()


def test_tightened_access_applies_to_new_connections_at_once(tmp_path: Path) -> None:
    require("nbdinfo")
    spec = ExportSpec("a", size=1 << 20, extra={"allow_addresses": ["127.0.0.0/8"]})
    server = start_server(tmp_path / "srv", [spec])
    try:
        client_a = connect_tcp(server, "a")
        client_a.pwrite(b"\x11" * 512, 0)
        reconfigure(server, [ExportSpec("a", size=1 << 20, extra=LAN)])
        record = hangup(server, "config.access_changed")
        assert record["export"] == "a" and record["keys"] == ["allow_addresses"]
        with pytest.raises(nbd.Error):
            connect_tcp(server, "a")  # A's address no longer matches: refused
        assert client_a.pread(512, 0) == b"\x11" * 512  # the open connection goes on
        client_a.pwrite(b"\x22" * 512, 512)
        other = connect(server, "a")  # Unix socket clients are not matched on addresses
        other.shutdown()
        # max_connections tightened below what is open: no new one, the open one stays
        reconfigure(server, [ExportSpec("a", size=1 << 20, extra={**LAN, "max_connections": 1})])
        record = hangup(server, "config.access_changed")
        assert record["keys"] == ["max_connections"]
        with pytest.raises(nbd.Error):
            connect(server, "a")
        assert client_a.pread(512, 512) == b"\x22" * 512
        client_a.shutdown()
    finally:
        assert server.stop() == 0
    assert '"config.export_changed"' not in server.log()
    assert '"limit": "export_max_connections"' in server.log()


def test_read_only_set_by_reload_applies_to_new_connections(tmp_path: Path) -> None:
    require("nbdinfo")
    server = start_server(tmp_path / "srv", [ExportSpec("a", size=1 << 20)], metrics=True)
    image = server.images["a"]
    try:
        before = connect(server, "a")
        reconfigure(server, [ExportSpec("a", size=1 << 20, read_only=True)])
        record = hangup(server, "config.access_changed")
        assert record["export"] == "a" and record["keys"] == ["read_only"]
        after = connect(server, "a")
        assert after.is_read_only() and not after.can_trim() and not after.can_zero()
        after.set_strict_mode(0)  # send the write anyway: the server must refuse it
        for write in (lambda: after.pwrite(b"\x33" * 4096, 0), lambda: after.zero(4096, 8192)):
            with pytest.raises(nbd.Error) as refused:
                write()
            assert refused.value.errno == "EPERM"
        assert after.pread(4096, 0) == bytes(4096)
        for command in ("write", "write_zeroes"):  # refused by the server, not by libnbd
            assert server.sample(_ERRORS, export="a", command=command, errno="1") == 1  # EPERM
        after.shutdown()
        assert not before.is_read_only()  # negotiated before the reload: keeps writing
        before.pwrite(b"\x44" * 512, 65536)
        before.flush()
        # and back: the device was opened writable, so no reopen is needed either way
        reconfigure(server, [ExportSpec("a", size=1 << 20)])
        assert hangup(server, "config.access_changed")["keys"] == ["read_only"]
        again = connect(server, "a")
        assert not again.is_read_only()
        again.shutdown()
        before.shutdown()
    finally:
        assert server.stop() == 0
    data = image.read_bytes()
    assert data[:65536] == bytes(65536)  # nothing from the read-only connection
    assert data[65536 : 65536 + 512] == b"\x44" * 512
