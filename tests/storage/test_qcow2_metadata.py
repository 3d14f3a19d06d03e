"""The metadata map: every metadata cluster of an image qemu-img made, by kind."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nbdguard.config import ExportConfig
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.qcow2.metadata import Kind
from nbdguard.storage.stack import build_device
from tests.storage.qcow2_patch import OFFSET_MASK, Qcow2File

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def open_image(path: Path, *, read_only: bool = False) -> Qcow2Image:
    device = build_device(ExportConfig(name="t", path=path, format="qcow2", read_only=read_only))
    assert isinstance(device, Qcow2Image)
    return device


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), "16M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 8M 4k", str(path))
    qemu("qemu-img", "snapshot", "-c", "s1", str(path))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 4k", str(path))
    return path


def test_map_names_every_metadata_cluster(image: Path) -> None:
    q = Qcow2File(image)
    bits = q.cluster_bits
    device = open_image(image, read_only=True)
    try:
        meta = device.metadata
        assert meta.kind_of(0) is Kind.HEADER
        assert meta.kind_of(q.l1_offset >> bits) is Kind.L1
        assert meta.kind_of(q.refcount_table_offset >> bits) is Kind.REFCOUNT_TABLE
        block = q.u64(q.refcount_table_offset) & ~0x1FF
        assert meta.kind_of(block >> bits) is Kind.REFCOUNT_BLOCK
        assert meta.kind_of(q.snapshots_offset >> bits) is Kind.SNAPSHOT_TABLE
        # The snapshot's L1 is elsewhere; its L2 for 0..2M is shared at first, then copied.
        active_l2 = q.u64(q.l1_entry_at(0)) & OFFSET_MASK
        assert meta.kind_of(active_l2 >> bits) is Kind.L2
        kinds = {meta.kind_of(c) for c in range(q.path.stat().st_size >> bits)}
        assert {Kind.SNAPSHOT_L1, Kind.SNAPSHOT_L2} <= kinds
        data = q.u64(q.l2_entry_at(8 << 20)) & OFFSET_MASK
        assert not meta.is_metadata(data >> bits)
        assert meta.findings == []
    finally:
        device.close()


def test_map_follows_new_l2_tables_and_refcount_blocks(tmp_path: Path) -> None:
    path = tmp_path / "b.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "64M")
    device = open_image(path)
    try:
        before = len(device.metadata)
        device.pwrite(b"x" * 512, 40 << 20)  # a new L2 table (and data cluster)
        table = device.l1[(40 << 20) >> (device.l2_bits + device.cluster_bits)] & OFFSET_MASK
        assert device.metadata.kind_of(table >> device.cluster_bits) is Kind.L2
        # 512-byte clusters, 16-bit refcounts: a block counts 256 clusters; each write below
        # takes a new L2 table and a data cluster, so 300 of them need a second block.
        for index in range(300):
            device.pwrite(b"y" * 512, index << 15)
        blocks = [e & ~0x1FF for e in device.refcounts.table if e] if device.refcounts else []
        assert len(blocks) >= 2
        for block in blocks:
            assert device.metadata.kind_of(block >> device.cluster_bits) is Kind.REFCOUNT_BLOCK
        assert len(device.metadata) > before
        first = device.l1[0] & OFFSET_MASK
        assert device.metadata.kind_of(first >> device.cluster_bits) is Kind.L2
        word = device._entry(0)[0]
        assert not device.metadata.is_metadata((word & OFFSET_MASK) >> device.cluster_bits)
    finally:
        device.close()
    result = subprocess.run(["qemu-img", "check", str(path)], capture_output=True)
    assert result.returncode == 0, result.stdout
