"""The sector-zero guard through real clients: libnbd (as nbdsh), qemu-io, nbdcopy, Prometheus
text from /metrics, and qemu-img probing the file afterwards."""

from __future__ import annotations

import itertools
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdguard.guard.signatures import detect_header
from tests.guard.samples import (
    MBR,
    NOT_DETECTED_BY_QEMU,
    QEMU_HEADERS,
    STRICT_ONLY,
)
from tests.interop.conftest import ExportSpec, RunningServer, require, run, sample, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop

CASES = [("qemu", fmt, header) for fmt, header in sorted(QEMU_HEADERS.items())] + [
    ("strict", fmt, header) for fmt, header in sorted({**QEMU_HEADERS, **STRICT_ONLY}.items())
]
CASE_IDS = [f"{rules}-{fmt}" for rules, fmt, _ in CASES]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("guard"),
        [
            ExportSpec("qemu", size=8 << 20),
            ExportSpec("strict", size=8 << 20, extra={"header_guard": "strict"}),
            ExportSpec("luks-ok", size=1 << 20, extra={"allow_headers": ["luks"]}),
            ExportSpec("unguarded", size=1 << 20, extra={"header_guard": "off"}),
        ],
        metrics=True,
    )
    yield running
    assert running.stop() == 0, running.log()


def _needed_zero(header: bytes, rules: str) -> int | None:
    """A zero byte of the header without which the rule set no longer matches."""
    for index in range(len(header)):
        if not header[index]:
            dirty = bytearray(header)
            dirty[index] = 0x5C
            if detect_header(bytes(dirty), rules) is None:
                return index
    return None


def connect(server: RunningServer, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri(export))
    return h


def refused(call: object, *args: object) -> bool:
    try:
        call(*args)  # type: ignore[operator]
    except nbd.Error as err:
        assert err.errno in ("EPERM", 1), err
        return True
    return False


def reset(h: nbd.NBD) -> None:
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)


def probed_format(path: Path) -> str:
    """What qemu-img believes the file is when it probes (no -f; -U: we hold the lock)."""
    result = run("qemu-img", "info", "-U", "--output=json", str(path))
    return str(json.loads(result.stdout)["format"])


@pytest.fixture
def h(guarded: RunningServer, request: pytest.FixtureRequest) -> Iterator[nbd.NBD]:
    handle = connect(guarded, request.param)
    reset(handle)
    yield handle
    handle.shutdown()


@pytest.mark.parametrize(("rules", "fmt", "header"), CASES, ids=CASE_IDS)
def test_header_refused_every_way(
    guarded: RunningServer, rules: str, fmt: str, header: bytes
) -> None:
    require("qemu-img")
    h = connect(guarded, rules)
    image = guarded.images[rules]
    # (a) one 512-byte write, and one that also spans into sector 1
    reset(h)
    before = image.read_bytes()[:8192]
    assert refused(h.pwrite, header, 0)
    assert refused(h.pwrite, header + b"\x99" * 3584, 0)
    assert image.read_bytes()[:8192] == before
    # (b) byte by byte in random order: refused at the byte that would complete it
    order = [i for i in range(512) if header[i]]
    random.Random(CASE_IDS.index(f"{rules}-{fmt}")).shuffle(order)
    refusals = [i for i in order if refused(h.pwrite, header[i : i + 1], i)]
    assert refusals and h.pread(512, 0) != header
    # (c) unaligned chunks that straddle offset 512
    reset(h)
    payload = header + b"\xee" * 700
    cuts = [0, 5, 77, 300, 511, len(payload)]
    refusals = [a for a, b in itertools.pairwise(cuts) if refused(h.pwrite, payload[a:b], a)]
    assert refusals
    # (d) the last needed bytes supplied by WRITE_ZEROES or TRIM: a zero the rule needs
    needed_zero = _needed_zero(header, rules)
    if needed_zero is not None:
        dirty = bytearray(header)
        dirty[needed_zero] = 0x5C
        for method in (h.zero, h.trim):
            reset(h)
            h.pwrite(bytes(dirty), 0)
            assert refused(method, 1, needed_zero)
    assert probed_format(image) == "raw"
    h.shutdown()


@pytest.mark.parametrize(("rules", "fmt", "header"), CASES, ids=CASE_IDS)
def test_two_connections_racing_halves(
    guarded: RunningServer, rules: str, fmt: str, header: bytes
) -> None:
    require("qemu-img")
    handles = [connect(guarded, rules) for _ in range(2)]
    reset(handles[0])
    odd = [(i, header[i : i + 1]) for i in range(512) if header[i] and i % 2]
    even = [(i, header[i : i + 1]) for i in range(512) if header[i] and not i % 2]
    outcomes: list[list[bool]] = [[], []]

    def writer(index: int, pieces: list[tuple[int, bytes]]) -> None:
        for offset, byte in pieces:
            outcomes[index].append(refused(handles[index].pwrite, byte, offset))

    threads = [threading.Thread(target=writer, args=(i, p)) for i, p in enumerate((odd, even))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(sum(o) for o in outcomes) >= 1
    assert handles[0].pread(512, 0) != header
    assert probed_format(guarded.images[rules]) == "raw"
    for handle in handles:
        handle.shutdown()


@pytest.mark.parametrize("h", ["qemu", "strict"], indirect=True)
@pytest.mark.parametrize(
    "name", ["zeros", "mbr", "gpt-protective-mbr", "fat", "ntfs", "luks2", "qcow-version-0"]
)
def test_real_content_is_accepted(h: nbd.NBD, name: str, guarded: RunningServer) -> None:
    content = NOT_DETECTED_BY_QEMU[name]
    if name == "qcow-version-0" and h.get_export_name() == "strict":
        assert refused(h.pwrite, content, 0)  # OpenBSD vmd would take it for qcow2
        return
    h.pwrite(content, 0)
    h.flush()
    assert guarded.images[h.get_export_name()].read_bytes()[:512] == content


@pytest.mark.parametrize("name", sorted(NOT_DETECTED_BY_QEMU))
def test_every_near_miss_passes_the_qemu_rules(guarded: RunningServer, name: str) -> None:
    h = connect(guarded, "qemu")
    h.pwrite(NOT_DETECTED_BY_QEMU[name], 0)
    assert h.pread(512, 0) == NOT_DETECTED_BY_QEMU[name]
    h.shutdown()


def test_mkfs_ext4_through_nbdcopy(guarded: RunningServer, tmp_path: Path) -> None:
    require("mkfs.ext4", "nbdcopy", "qemu-img")
    fs = tmp_path / "fs.raw"
    with open(fs, "wb") as handle:
        handle.truncate(8 << 20)
    run("mkfs.ext4", "-q", "-F", str(fs))
    boot = bytearray(fs.read_bytes()[:512])
    boot[:512] = MBR  # a partition table in front of it, as installers write
    with open(fs, "r+b") as handle:
        handle.write(boot)
    run("nbdcopy", str(fs), guarded.uri("qemu"))
    assert guarded.images["qemu"].read_bytes() == fs.read_bytes()
    assert probed_format(guarded.images["qemu"]) == "raw"


def test_qemu_io_header_write_is_refused(guarded: RunningServer, tmp_path: Path) -> None:
    require("qemu-io")
    source = tmp_path / "hdr.bin"
    source.write_bytes(QEMU_HEADERS["qcow2"])
    result = run(
        "qemu-io", "-f", "raw", "-c", f"write -s {source} 0 512", guarded.uri("qemu"), check=False
    )
    assert "Operation not permitted" in result.stdout + result.stderr
    ok = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 512", guarded.uri("qemu"))
    assert "wrote 512/512" in ok.stdout


def test_blocked_write_is_counted_and_audited(guarded: RunningServer) -> None:
    blocked = "nbdguard_header_writes_blocked_total"
    labels = {"command": "write", "export": "qemu", "format": "vdi"}
    earlier = guarded.sample(blocked, **labels) or 0  # the module's server saw other tests
    h = connect(guarded, "qemu")
    reset(h)
    before = guarded.images["qemu"].read_bytes()[:4096]
    assert refused(h.pwrite, QEMU_HEADERS["vdi"], 0)
    assert refused(h.pwrite, QEMU_HEADERS["vpc"] + bytes(1024), 0)
    h.shutdown()
    assert guarded.images["qemu"].read_bytes()[:4096] == before
    _, text = guarded.scrape()
    assert sample(text, blocked, **labels) == earlier + 1
    assert (sample(text, "nbdguard_sector0_rmw_total", export="qemu") or 0) >= 1
    events = [json.loads(line) for line in guarded.log().splitlines() if line.startswith("{")]
    audit = [
        e for e in events if e["event"] == "guard.header_write_blocked" and e["format"] == "vpc"
    ]
    assert audit, "no audit event"
    event = audit[-1]
    assert event["export"] == "qemu" and event["command"] == "write"
    assert event["offset"] == 0 and event["length"] == 1536
    assert event["sector_head"] == QEMU_HEADERS["vpc"][:16].hex()
    assert event["client"] and event["level"] == "warning"


def test_allow_headers_lets_luks_through_but_nothing_else(guarded: RunningServer) -> None:
    h = connect(guarded, "luks-ok")
    h.pwrite(QEMU_HEADERS["luks"], 0)
    assert h.pread(512, 0) == QEMU_HEADERS["luks"]
    h.pwrite(bytes(512), 0)
    assert refused(h.pwrite, QEMU_HEADERS["qcow2"], 0)
    h.shutdown()


def test_header_guard_off_writes_anything(guarded: RunningServer, tmp_path: Path) -> None:
    require("qemu-img")
    qcow2 = tmp_path / "real.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1M")
    h = connect(guarded, "unguarded")
    h.pwrite(qcow2.read_bytes(), 0)
    h.flush()
    h.shutdown()
    # ...which is exactly the danger the guard exists for:
    assert probed_format(guarded.images["unguarded"]) != "raw"


def test_existing_header_refuses_by_default_and_warn_warns(tmp_path: Path) -> None:
    header = QEMU_HEADERS["qcow"]
    with pytest.raises(RuntimeError, match="already holds a qcow header"):
        start_server(tmp_path / "refuse", [ExportSpec("old", size=1 << 20, fill=header)])
    server = start_server(
        tmp_path / "warn",
        [ExportSpec("old", size=1 << 20, fill=header, extra={"on_existing_header": "warn"})],
        metrics=True,
    )
    log = server.log()
    assert server.stop() == 0
    warning = [json.loads(x) for x in log.splitlines() if "export.existing_header" in x]
    assert warning and warning[0]["format"] == "qcow" and warning[0]["export"] == "old"


def test_existing_header_gauge(tmp_path: Path) -> None:
    spec = ExportSpec(
        "old", size=1 << 20, fill=QEMU_HEADERS["vhdx"], extra={"on_existing_header": "warn"}
    )
    server = start_server(tmp_path / "g", [spec], metrics=True)
    gauge = server.sample("nbdguard_export_existing_header", export="old", format="vhdx")
    assert server.stop() == 0
    assert gauge == 1


def test_qcow2_external_raw_data_file_is_guarded(tmp_path: Path) -> None:
    """A guest header aimed at a qcow2 export's external raw data file (guest offset 0 is
    data-file offset 0) is refused and audited like a raw export's (issue 13 item 6)."""
    require("qemu-img", "qemu-io")
    directory = tmp_path / "df"
    directory.mkdir()
    image, data = directory / "t.qcow2", directory / "d.raw"
    options = f"data_file={data},data_file_raw=on"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(image), "4M")
    server = start_server(directory, [ExportSpec("dq", image=image, format="qcow2")], metrics=True)
    try:
        source = tmp_path / "hdr.bin"
        source.write_bytes(QEMU_HEADERS["qcow2"])
        uri = server.uri("dq")
        result = run("qemu-io", "-f", "raw", "-c", f"write -s {source} 0 512", uri, check=False)
        assert "Operation not permitted" in result.stdout + result.stderr
        h = connect(server, "dq")
        assert refused(h.pwrite, QEMU_HEADERS["vmdk"] + bytes(3584), 0)
        h.shutdown()
        assert data.read_bytes()[:4096] == bytes(4096)
        blocked = "nbdguard_header_writes_blocked_total"
        assert server.sample(blocked, export="dq", format="qcow2", command="write") == 1
        assert server.sample(blocked, export="dq", format="vmdk", command="write") == 1
        ok = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 512", uri)
        assert "wrote 512/512" in ok.stdout
    finally:
        assert server.stop() == 0, server.log()
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    audit = [e for e in events if e["event"] == "guard.header_write_blocked"]
    assert [(e["export"], e["format"]) for e in audit] == [("dq", "qcow2"), ("dq", "vmdk")]
    assert data.read_bytes()[:512] == b"\x55" * 512
    assert probed_format(data) == "raw"
