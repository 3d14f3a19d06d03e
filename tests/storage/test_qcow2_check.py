"""check_on_open = "full": qemu-img check's reference walk, on images qemu-img made and then
patched; each classification is compared with `qemu-img check --output=json` on the same
image (its counts of leaks and corruptions)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdguard.config import CheckOnOpen, ExportConfig
from nbdguard.errors import ChainRefused
from nbdguard.inspection import inspect_chain
from nbdguard.storage.chain import resolve_chain
from nbdguard.storage.device import BlockDevice
from nbdguard.storage.qcow2 import check
from nbdguard.storage.qcow2.check import CheckReport, check_image, decode_refcounts
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.stack import build_device
from tests.storage.qcow2_patch import COPIED, OFFSET_MASK, Qcow2File

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

MiB = 1 << 20


def qemu(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, cwd=cwd)


def qemu_check(path: Path) -> tuple[int, int]:
    """(leaks, corruptions) as `qemu-img check` counts them."""
    result = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True,
        text=True,
        cwd=path.parent,  # where qemu-img looks for a relative data file name
    )
    assert result.returncode in (0, 2, 3), result.stderr
    report = json.loads(result.stdout)
    assert report.get("check-errors", 0) == 0, report
    return report.get("leaks", 0), report.get("corruptions", 0)


def our_check(path: Path) -> CheckReport:
    chain = resolve_chain(ExportConfig(name="t", path=path, format="qcow2", read_only=True))
    try:
        layer = chain.layers[0]
        assert layer.header is not None
        return check_image(layer.header, HostFile(layer.file))
    finally:
        chain.close()


def open_export(path: Path, mode: CheckOnOpen, *, read_only: bool = False) -> BlockDevice:
    config = ExportConfig(
        name="t", path=path, format="qcow2", read_only=read_only, check_on_open=mode
    )
    return build_device(config)


def assert_agrees_with_qemu(path: Path, report: CheckReport) -> None:
    assert (report.leaks, report.corruptions) == qemu_check(path), report.as_dict()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """4 KiB clusters over a raw backing file: data in two L2 tables, a snapshot taken
    between writes (shared and copied L2 tables, refcounts of 2), a persistent bitmap."""
    qemu("qemu-img", "create", "-q", "-f", "raw", "base.raw", "8M", cwd=tmp_path)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 7 0 8M", "base.raw", cwd=tmp_path)
    path = tmp_path / "a.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw",
         "-F", "raw", str(path), "8M")  # fmt: skip
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 4M 8k", str(path))
    qemu("qemu-img", "snapshot", "-c", "s1", str(path))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 4k", str(path))
    qemu("qemu-img", "bitmap", "--add", str(path), "b0")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 4 1M 64k", str(path))
    return path


def test_a_clean_image_has_no_findings_and_qemu_agrees(image: Path) -> None:
    report = our_check(image)
    assert report.clean, report.as_dict()
    assert report.data_bytes >= (64 + 8 + 64) << 10
    assert report.l2_tables >= 3  # two active, one the snapshot kept
    assert_agrees_with_qemu(image, report)
    device = open_export(image, "full")
    try:
        assert bytes(device.pread(4096, 4096)) == b"\x01" * 4096
    finally:
        device.close()


def test_compressed_clusters_are_counted_per_span(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(range(256)) * 4096 + os.urandom(MiB))
    path = tmp_path / "c.qcow2"
    qemu("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", str(raw), str(path))
    report = our_check(path)
    assert report.clean, report.as_dict()
    assert_agrees_with_qemu(path, report)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width(tmp_path: Path, bits: int) -> None:
    path = tmp_path / "w.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size=4k,refcount_bits={bits}",
         str(path), "8M")  # fmt: skip
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 256k", "-c", "write -P 2 6M 4k", str(path))
    if bits > 1:  # a refcount of 2 does not fit in 1 bit: qemu-img refuses to snapshot
        qemu("qemu-img", "snapshot", "-c", "s1", str(path))
    report = our_check(path)
    assert report.clean, report.as_dict()
    q = Qcow2File(path)
    q.set_u64(q.l2_entry_at(0), 0)  # a leak (of 2 references, with the snapshot's table)
    report = our_check(path)
    assert report.leaks == 1 and report.errors == 0, report.as_dict()
    assert_agrees_with_qemu(path, report)


def test_decode_refcounts_bit_order() -> None:
    assert list(decode_refcounts(b"\x1b", 2)) == [3, 2, 1, 0]  # lowest bits first
    assert list(decode_refcounts(b"\x21", 4)) == [1, 2]
    assert list(decode_refcounts(b"\x05", 1)) == [1, 0, 1, 0, 0, 0, 0, 0]
    assert list(decode_refcounts(b"\x00\x02\x01\x00", 16)) == [2, 256]
    assert list(decode_refcounts(b"\0" * 4 + b"\1" + b"\0" * 3 + b"\xff" * 8, 64)) == [
        1 << 24,
        2**32 - 1,
    ]


def test_extended_l2_image_is_clean(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on",
         str(path), "64M")  # fmt: skip
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4k", "-c", "write -P 2 40M 128k", str(path))
    report = our_check(path)
    assert report.clean, report.as_dict()
    assert_agrees_with_qemu(path, report)


def test_a_planted_leak_is_reported_and_the_image_still_opens(image: Path) -> None:
    q = Qcow2File(image)
    q.set_u64(q.l2_entry_at(1 << 20), 0)  # the data cluster keeps its refcount of 1
    report = our_check(image)
    assert report.counts == {"leak": 1}, report.as_dict()
    assert report.errors == 0 and "leak" in report.summary()
    assert_agrees_with_qemu(image, report)
    device = open_export(image, "full")
    device.close()


# ---------------------------------------------------------------- corruption


def l2_at_refcount_table(q: Qcow2File) -> int:
    return q.refcount_table_offset


def l2_at_other_l2(q: Qcow2File) -> int:
    return q.u64(q.l1_entry_at(4 << 20)) & OFFSET_MASK


def l2_at_l1(q: Qcow2File) -> int:
    return q.l1_offset


@pytest.mark.parametrize("target", [l2_at_refcount_table, l2_at_other_l2, l2_at_l1])
def test_an_l2_entry_into_metadata_is_refused(
    image: Path, target: Callable[[Qcow2File], int]
) -> None:
    q = Qcow2File(image)
    guest = 1 << 20  # written after the snapshot: refcount 1, COPIED
    aim = target(q)
    q.set_u64(q.l2_entry_at(guest), aim | COPIED)
    report = our_check(image)
    assert report.counts.get("overlap") == 1, report.as_dict()
    assert report.counts.get("refcount_low") == 1 and report.leaks == 1, report.as_dict()
    assert_agrees_with_qemu(image, report)
    with pytest.raises(ChainRefused) as refused:
        open_export(image, "full")
    assert refused.value.reason == "corrupt"
    assert f"{aim:#x}" in str(refused.value) and "overlap" in str(refused.value)
    # light: opened; the entry is refused when the guest reaches it (EIO), not before
    device = open_export(image, "light", read_only=True)
    try:
        assert bytes(device.pread(0, 4096)) == b"\x03" * 4096
        with pytest.raises(OSError) as failed:
            device.pread(guest, 4096)
        assert failed.value.errno == errno.EIO
    finally:
        device.close()


def test_a_refcount_of_zero_under_a_used_cluster_is_refused(image: Path) -> None:
    q = Qcow2File(image)
    data = q.u64(q.l2_entry_at(1 << 20)) & OFFSET_MASK
    q.set_refcount(data >> q.cluster_bits, 0)
    report = our_check(image)
    assert report.counts == {"refcount_low": 1, "copied_wrong": 1}, report.as_dict()
    assert_agrees_with_qemu(image, report)
    with pytest.raises(ChainRefused) as refused:
        open_export(image, "full")
    assert refused.value.reason == "corrupt" and "refcount 0, 1 references" in str(refused.value)


def test_an_entry_past_the_end_of_the_file_is_refused(image: Path) -> None:
    q = Qcow2File(image)
    past = (image.stat().st_size + (64 << 20)) & ~(q.cluster_size - 1)
    q.set_u64(q.l2_entry_at(1 << 20), past | COPIED)
    report = our_check(image)
    assert report.counts == {"past_eof": 1, "copied_wrong": 1, "leak": 1}, report.as_dict()
    assert_agrees_with_qemu(image, report)
    with pytest.raises(ChainRefused) as refused:
        open_export(image, "full")
    assert refused.value.reason == "corrupt" and "past_eof" in str(refused.value)


def test_a_compressed_span_over_the_l1_table_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(os.urandom(64 << 10))
    path = tmp_path / "c.qcow2"
    qemu("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", str(raw), str(path))
    q = Qcow2File(path)
    entry = q.l2_entry_at(0)
    word = q.u64(entry)
    shift = 62 - (q.cluster_bits - 8)
    q.set_u64(entry, (word & ~((1 << shift) - 1)) | q.l1_offset)
    report = our_check(path)
    assert report.counts.get("overlap") == 1, report.as_dict()
    assert_agrees_with_qemu(path, report)
    with pytest.raises(ChainRefused):
        open_export(path, "full", read_only=True)


def test_a_backing_layer_is_checked_too(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(base), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(base))
    top = tmp_path / "top.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top),
         "8M")  # fmt: skip
    q = Qcow2File(base)
    q.set_u64(q.l2_entry_at(0), q.refcount_table_offset | COPIED)
    with pytest.raises(ChainRefused) as refused:
        open_export(top, "full")
    assert refused.value.layer == 1 and refused.value.reason == "corrupt"
    open_export(top, "light").close()


def test_progress_is_reported_while_checking(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "PROGRESS_SECONDS", 0.0)
    states: list[dict[str, object]] = []
    chain = resolve_chain(ExportConfig(name="t", path=image, format="qcow2", read_only=True))
    try:
        layer = chain.layers[0]
        assert layer.header is not None
        check_image(layer.header, HostFile(layer.file), progress=states.append)
    finally:
        chain.close()
    phases = {state["phase"] for state in states}
    assert {"refcounts", "l2_tables", "compare"} <= phases, states
    assert all(isinstance(state["done"], int) for state in states)


def test_too_many_clusters_is_refused_not_walked(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check, "MAX_CHECK_CLUSTERS", 8)
    report = our_check(image)
    assert report.counts == {"too_large": 1} and report.errors == 1


def test_inspect_reports_the_findings(image: Path) -> None:
    q = Qcow2File(image)
    q.set_u64(q.l2_entry_at(1 << 20), q.l1_offset | COPIED)
    report = inspect_chain(image, "qcow2")
    assert report.refused is None
    found = report.layers[0]["check"]
    assert isinstance(found, dict)
    assert found["counts"] == {"leak": 1, "overlap": 1, "refcount_low": 1}
    assert (found["leaks"], found["corruptions"]) == qemu_check(image)
    assert "check" not in report.layers[1]  # the raw backing file
    text = report.as_text()
    assert "check: 1 leak, 1 overlap, 1 refcount_low" in text
    assert f"data cluster {q.l1_offset:#x} is l1" in text
    assert json.loads(report.as_json())["layers"][0]["check"]["errors"] == 2
    clean = inspect_chain(image.parent / "base.raw", "raw")
    assert "check" not in clean.layers[0]


def test_a_hostile_image_stops_the_walk_once_it_is_refused(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check, "STOP_AFTER_ERRORS", 3)
    q = Qcow2File(image)
    past = (image.stat().st_size + (64 << 20)) & ~(q.cluster_size - 1)
    for index in range(10):
        q.set_u64(q.l2_entry_at((256 << 10) + index * q.cluster_size), past | COPIED)
    report = our_check(image)
    assert report.stopped and report.errors == 3, report.as_dict()
    assert "leak" not in report.counts  # the comparison never ran


def test_version_2_and_data_file_images_are_clean(tmp_path: Path) -> None:
    v2 = tmp_path / "v2.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", str(v2),
         "8M")  # fmt: skip
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(v2))
    qemu("qemu-img", "snapshot", "-c", "s1", str(v2))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 2 0 4k", str(v2))
    data = tmp_path / "d.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,cluster_size=4k",
         "d.qcow2", "8M", cwd=tmp_path)  # fmt: skip
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 4M 4k", "d.qcow2",
         cwd=tmp_path)  # fmt: skip
    for path in (v2, data):
        report = our_check(path)
        assert report.clean, (path, report.as_dict())
        assert_agrees_with_qemu(path, report)
        # per table reference: the snapshot's 16 clusters and the active table's 16
        assert report.data_bytes == (0 if path == data else 2 * 64 << 10)
