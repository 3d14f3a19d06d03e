"""Real clients against a live nbdguard: libnbd tools, qemu, nbd-client, fio."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.interop.conftest import RunningServer, require, run

pytestmark = pytest.mark.interop


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nbdinfo_list(server: RunningServer, transport: str) -> None:
    require("nbdinfo")
    result = run("nbdinfo", "--list", "--json", server.uri("", transport))
    listed = json.loads(result.stdout)["exports"]
    by_name = {e["export-name"]: e for e in listed}
    assert set(by_name) == {"vm1", "ro", "odd", ""}
    assert by_name["vm1"]["export-size"] == 64 << 20
    assert by_name["ro"]["is_read_only"] is True
    assert by_name["vm1"]["description"] == "test export vm1"
    assert by_name["vm1"]["can_multi_conn"] is True
    assert by_name["vm1"]["block_size_maximum"] == 32 << 20


def test_nbdinfo_map_shows_holes_and_data(server: RunningServer, transport: str) -> None:
    require("nbdinfo", "qemu-io")
    uri = server.uri("vm1", transport)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 64k", uri)
    result = run("nbdinfo", "--map", "--json", uri)
    extents = json.loads(result.stdout)
    assert sum(e["length"] for e in extents) == 64 << 20
    data = [e for e in extents if e["type"] == 0]
    assert any(e["offset"] <= 1 << 20 < e["offset"] + e["length"] for e in data)
    assert any(e["type"] == 3 for e in extents)  # hole + zero


def test_qemu_img_info_convert_compare(
    server: RunningServer, transport: str, tmp_path: Path
) -> None:
    require("qemu-img")
    uri = server.uri("vm1", transport)
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", uri).stdout)
    assert info["virtual-size"] == 64 << 20
    source = tmp_path / "src.raw"
    source.write_bytes(bytes(range(256)) * 4096 + bytes(3 << 20))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri, timeout=300)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out), timeout=300)
    assert out.read_bytes()[: source.stat().st_size] == source.read_bytes()


def test_qemu_io_write_read_pattern(server: RunningServer, transport: str) -> None:
    require("qemu-io")
    uri = server.uri("vm1", transport)
    result = run(
        "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "read -P 0xab 1M 64k", uri
    )
    assert "read 65536/65536 bytes" in result.stdout
    data = server.images["vm1"].read_bytes()[1 << 20 : (1 << 20) + 65536]
    assert data == b"\xab" * 65536


def test_qemu_io_read_only_export_refuses_writes(server: RunningServer) -> None:
    require("qemu-io")
    result = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", server.uri("ro"), check=False)
    assert result.returncode != 0 or "Operation not permitted" in result.stdout + result.stderr
    assert server.images["ro"].read_bytes()[:4096] == b"\x5a" * 4096


def test_nbdcopy_both_directions(server: RunningServer, transport: str, tmp_path: Path) -> None:
    require("nbdcopy")
    source = tmp_path / "in.raw"
    source.write_bytes((b"nbdguard" * 128) * 8192 + bytes(8 << 20) + b"\xee" * (8 << 20))
    sized = tmp_path / "sized.raw"
    sized.write_bytes(source.read_bytes() + bytes((64 << 20) - source.stat().st_size))
    uri = server.uri("vm1", transport)
    run("nbdcopy", str(sized), uri, timeout=300)
    assert sha256(server.images["vm1"]) == sha256(sized)
    back = tmp_path / "back.raw"
    run("nbdcopy", uri, str(back), timeout=300)
    assert sha256(back) == sha256(sized)


def test_unaligned_export_tail(server: RunningServer) -> None:
    import nbd

    h = nbd.NBD()
    h.connect_uri(server.uri("odd"))
    assert h.get_size() == 1000
    h.pwrite(b"tail!", 995)
    assert h.pread(10, 990) == bytes(5) + b"tail!"
    h.flush()
    h.shutdown()
    assert server.images["odd"].read_bytes()[995:] == b"tail!"


def test_nbd_client_list(server: RunningServer, transport: str) -> None:
    require("nbd-client")
    if transport == "unix":
        command = ["nbd-client", "-l", "-u", str(server.socket_path)]
    else:
        command = ["nbd-client", "-l", "127.0.0.1", str(server.port)]
    result = run(*command, check=False)
    names = set(result.stdout.split())
    assert {"vm1", "ro", "odd"} <= names, result.stdout + result.stderr


@pytest.mark.parametrize("block", ["4k", "1m"])  # 1m: payloads written in parts as they arrive
def test_fio_randrw_verifies(
    server: RunningServer, transport: str, tmp_path: Path, block: str
) -> None:
    require("fio")
    job = tmp_path / "job.fio"
    job.write_text(
        "[global]\n"
        "ioengine=nbd\n"
        f"uri={server.uri('vm1', transport)}\n"
        "size=32M\n"
        f"bs={block}\n"
        "iodepth=32\n"
        "rw=randrw\n"
        "verify=crc32c\n"
        "do_verify=1\n"
        "verify_fatal=1\n"
        "verify_state_save=0\n"
        "[check]\n"
    )
    result = run("fio", "--output-format=json", str(job), timeout=300)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    [job_report] = report["jobs"]
    assert job_report["error"] == 0
    assert job_report["write"]["io_bytes"] > 0 and job_report["read"]["io_bytes"] > 0


def test_nbdsh_script(server: RunningServer, transport: str) -> None:
    require("nbdsh")
    script = (
        "h.pwrite(b'x' * 512, 0)\nassert h.pread(512, 0) == b'x' * 512\nprint('ok', h.get_size())\n"
    )
    result = run("nbdsh", "-u", server.uri("vm1", transport), "-c", script)
    assert re.search(r"ok 67108864", result.stdout)
