"""The sector-zero guard on a qcow2 image's external data file (issue 13 item 6): with a data
file, guest offset 0 is data-file offset 0, so a guest header written there would make the
data file probe as that format. Requests are framed as a client would send them and served
by the export's dispatcher, so refusals are audited exactly as on the wire."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from nbdguard.config import ExportConfig
from nbdguard.errors import ExportOpenError
from nbdguard.guard.datafile import DataFileGuard
from nbdguard.observability.metrics import Metrics
from nbdguard.protocol.constants import Command, NBDError
from nbdguard.protocol.transmission import RequestParser
from nbdguard.protocol.validate import SessionLimits
from nbdguard.server.dispatch import Dispatcher
from nbdguard.server.exports import Export, open_export
from nbdguard.storage.stack import build_device
from tests.guard.samples import MBR, QEMU_HEADERS
from tests.protocol.nbdwire import request
from tests.server.test_dispatch import Wire
from tests.storage.qcow2_patch import COPIED, OFFSET_MASK, Qcow2File

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

SIZE = 4 << 20
CLUSTER = 65536


def qemu_img(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """qemu-img run in the image's directory (it opens a relative data-file name there)."""
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, cwd=directory, check=False
    )


def make_image(directory: Path, *, raw_bit: bool = True) -> tuple[Path, Path]:
    options = "data_file=d.raw" + (",data_file_raw=on" if raw_bit else "")
    done = qemu_img(directory, "create", "-q", "-f", "qcow2", "-o", options, "t.qcow2", str(SIZE))
    assert done.returncode == 0, done.stderr
    return directory / "t.qcow2", directory / "d.raw"


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path]:
    return make_image(tmp_path)


def probed(path: Path) -> str:
    """What qemu-img believes the file is when it probes it (no -f)."""
    done = qemu_img(path.parent, "info", "-U", "--output=json", path.name)
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["format"])


class Served:
    """One export opened as the server opens it, with a connection's dispatcher."""

    def __init__(self, path: Path, **config: Any) -> None:
        self.config = ExportConfig(name="vm", path=path, format="qcow2", **config)
        self.export: Export = open_export(self.config, Metrics().for_export("vm"))
        limits = SessionLimits(SIZE, False, False, False, 32 << 20)
        self.wire = Wire()
        log = structlog.get_logger()
        self.dispatcher = Dispatcher(self.export, limits, (), self.wire.send, log)

    def send(self, command: int, offset: int, length: int, payload: bytes = b"") -> int:
        """The NBD error the request is answered with (0: done)."""
        for event in RequestParser().receive(request(command, offset, length, cookie=9) + payload):
            self.dispatcher.receive(event)
        error, cookie, _ = self.wire.simple()
        assert cookie == 9
        return error

    def write(self, offset: int, data: bytes) -> int:
        return self.send(Command.WRITE, offset, len(data), data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.export.device.pread(offset, length))

    def blocked(self, fmt: str, command: str = "write") -> float:
        counter = self.export.metrics.metrics.header_writes_blocked
        return float(counter.labels(export="vm", format=fmt, command=command)._value.get())

    def close(self) -> None:
        self.export.close()


@pytest.fixture
def served(image: tuple[Path, Path]) -> Iterator[Served]:
    export = Served(image[0])
    yield export
    export.close()


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_header_write_at_offset_0_is_refused_and_audited(
    image: tuple[Path, Path], served: Served, fmt: str
) -> None:
    _, data = image
    assert isinstance(served.export.device, DataFileGuard)
    before = data.read_bytes()
    with capture_logs() as events:
        assert served.write(0, QEMU_HEADERS[fmt] + b"\xee" * 3584) == NBDError.EPERM
    assert data.read_bytes() == before  # nothing of the request written, byte for byte
    assert served.read(0, 4096) == bytes(4096)
    assert served.blocked(fmt) == 1
    audit = [e for e in events if e["event"] == "guard.header_write_blocked"]
    assert len(audit) == 1 and audit[0]["format"] == fmt and audit[0]["offset"] == 0
    assert probed(data) == "raw"


def test_header_completed_by_a_second_write_is_refused(
    image: tuple[Path, Path], served: Served
) -> None:
    """The magic alone is not a qcow2 header for QEMU's rules; the version that completes it
    is checked against what sector 0 already holds."""
    _, data = image
    assert served.write(0, b"QFI\xfb") == 0
    before = data.read_bytes()
    assert served.write(4, struct.pack(">I", 3)) == NBDError.EPERM
    assert data.read_bytes() == before
    assert served.blocked("qcow2") == 1


def test_zeroes_that_would_complete_a_header_are_refused(
    image: tuple[Path, Path], served: Served
) -> None:
    """Every command that changes sector 0 is checked: here zeroing one byte would turn
    'QED\\' into QED's magic 'QED\\0'."""
    _, data = image
    assert served.write(0, b"QED\\") == 0
    before = data.read_bytes()
    assert served.send(Command.WRITE_ZEROES, 3, 1) == NBDError.EPERM
    assert data.read_bytes() == before
    assert served.blocked("qed", "write_zeroes") == 1
    assert served.send(Command.TRIM, 0, 512) == 0  # all zeroes: no header
    assert data.read_bytes()[:512] == bytes(512)


def test_ordinary_writes_land_in_the_raw_data_file(image: tuple[Path, Path]) -> None:
    path, data = image
    served = Served(path)
    assert served.write(0, MBR) == 0
    assert served.write(1 << 20, b"\x5a" * 70000) == 0
    assert served.write(100, b"boot code") == 0
    served.close()
    model = bytearray(SIZE)
    model[0:512] = MBR
    model[100:109] = b"boot code"
    model[1 << 20 : (1 << 20) + 70000] = b"\x5a" * 70000
    (path.parent / "model.raw").write_bytes(model)
    as_raw = qemu_img(path.parent, "compare", "-f", "raw", "-F", "raw", "d.raw", "model.raw")
    assert as_raw.returncode == 0, as_raw.stdout + as_raw.stderr
    as_qcow2 = qemu_img(path.parent, "compare", "-f", "qcow2", "-F", "raw", "t.qcow2", "d.raw")
    assert as_qcow2.returncode == 0, as_qcow2.stdout + as_qcow2.stderr
    assert qemu_img(path.parent, "check", "t.qcow2").returncode == 0
    assert probed(data) == "raw"


def test_allow_headers_lets_a_listed_format_through(image: tuple[Path, Path]) -> None:
    path, data = image
    served = Served(path, allow_headers=frozenset({"vmdk"}))
    try:
        assert served.write(0, QEMU_HEADERS["vmdk"]) == 0
        assert data.read_bytes()[:512] == QEMU_HEADERS["vmdk"]
        assert served.write(0, QEMU_HEADERS["qcow2"]) == NBDError.EPERM
        assert data.read_bytes()[:512] == QEMU_HEADERS["vmdk"]
        assert served.blocked("vmdk") == 0 and served.blocked("qcow2") == 1
    finally:
        served.close()


def test_guard_off_writes_the_header(image: tuple[Path, Path]) -> None:
    """The test above can fail: without the guard the header lands in the data file."""
    path, data = image
    served = Served(path, header_guard="off")
    try:
        assert not isinstance(served.export.device, DataFileGuard)
        assert served.write(0, QEMU_HEADERS["qcow2"]) == 0
        assert data.read_bytes()[:512] == QEMU_HEADERS["qcow2"]
    finally:
        served.close()


def test_data_file_without_the_raw_bit_is_guarded_too(tmp_path: Path) -> None:
    """QEMU (and nbdguard) put guest cluster N at data-file cluster N with or without
    data_file_raw, and nbdguard clears that autoclear bit when it writes: the guard does
    not depend on it."""
    path, data = make_image(tmp_path, raw_bit=False)
    served = Served(path)
    try:
        assert served.write(0, MBR) == 0
        assert data.read_bytes()[:512] == MBR  # identity: guest 0 is data-file 0
        assert served.write(0, QEMU_HEADERS["qcow2"]) == NBDError.EPERM
        assert data.read_bytes()[:512] == MBR
    finally:
        served.close()


def test_guard_outlives_the_cleared_raw_bit(image: tuple[Path, Path]) -> None:
    path, data = image
    Served(path).close()  # a writable open clears data_file_raw
    assert Qcow2File(path).u64(88) == 0
    served = Served(path)
    try:
        assert served.write(0, QEMU_HEADERS["qcow2"]) == NBDError.EPERM
        assert data.read_bytes()[:512] == bytes(512)
    finally:
        served.close()


def test_hostile_mapping_onto_data_file_cluster_0_is_refused(image: tuple[Path, Path]) -> None:
    """An L2 entry that maps guest cluster 5 onto data-file cluster 0: the guest's sector 0
    is untouched, but the bytes would land in the data file's sector 0."""
    path, data = image
    q = Qcow2File(path)
    entry = q.l2_entry_at(5 * CLUSTER)
    assert q.u64(entry) & OFFSET_MASK == 5 * CLUSTER
    q.set_u64(entry, COPIED)  # host offset 0 (allocated: a data file may use offset 0)
    served = Served(path)
    try:
        assert served.write(5 * CLUSTER, MBR) == 0  # lands at data-file offset 0
        assert data.read_bytes()[:512] == MBR
        before = data.read_bytes()
        assert served.write(5 * CLUSTER, QEMU_HEADERS["vmdk"]) == NBDError.EPERM
        assert data.read_bytes() == before
        assert served.blocked("vmdk") == 1
    finally:
        served.close()


@pytest.mark.parametrize("action", ["warn", "refuse"])
def test_existing_header_in_the_data_file(image: tuple[Path, Path], action: str) -> None:
    path, data = image
    with data.open("r+b") as handle:
        handle.write(QEMU_HEADERS["qcow2"])
    config = ExportConfig(name="vm", path=path, format="qcow2", on_existing_header=action)
    if action == "refuse":
        with pytest.raises(ExportOpenError) as caught:
            build_device(config)
        assert caught.value.reason == "existing_header"
        assert "d.raw" in str(caught.value)
        return
    device = build_device(config)
    try:
        assert isinstance(device, DataFileGuard)
        assert device.existing_header() == "qcow2"
    finally:
        device.close()


def test_read_only_export_is_served_unchanged(image: tuple[Path, Path]) -> None:
    path, data = image
    with data.open("r+b") as handle:
        handle.write(MBR)
    before = (path.read_bytes(), data.read_bytes())
    device = build_device(ExportConfig(name="vm", path=path, format="qcow2", read_only=True))
    try:
        assert device.capabilities.read_only
        assert bytes(device.pread(0, 512)) == MBR
    finally:
        device.close()
    assert (path.read_bytes(), data.read_bytes()) == before
