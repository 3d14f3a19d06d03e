"""The metadata map: every metadata cluster of an image qemu-img made, by kind."""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nbdguard.config import ExportConfig
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.qcow2.metadata import Kind
from nbdguard.storage.stack import build_device
from tests.storage.qcow2_patch import COPIED, OFFSET_MASK, Qcow2File
from tests.storage.test_qcow2_hostile import Attack

BITMAP_KINDS = (Kind.BITMAP_DIRECTORY, Kind.BITMAP_TABLE, Kind.BITMAP_DATA)

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


# Persistent bitmaps: the directory, each bitmap's table and its data clusters are metadata.

BITMAPS_EXTENSION = 0x23852875
AUTOCLEAR_AT = 88
INCOMPATIBLE_AT = 72
CORRUPT_BIT = 1 << 1


@dataclass(frozen=True)
class BitmapLayout:
    """Where the bitmaps of an image are, read with a parser of the test's own."""

    directory: int
    tables: list[int]
    data: list[int]
    extension: int  # file offset of the extension's payload

    def clusters(self, bits: int) -> set[int]:
        return {offset >> bits for offset in [self.directory, *self.tables, *self.data]}


def bitmap_layout(q: Qcow2File) -> BitmapLayout:
    head = q.path.read_bytes()[: q.cluster_size]
    position = struct.unpack_from(">I", head, 100)[0]  # header_length
    while True:
        kind, length = struct.unpack_from(">II", head, position)
        assert kind, "no bitmaps extension"
        if kind == BITMAPS_EXTENSION:
            count, _, size, directory = struct.unpack_from(">IIQQ", head, position + 8)
            extension = position + 8
            break
        position += 8 + ((length + 7) & ~7)
    entries = q.path.read_bytes()[directory : directory + size]
    tables: list[int] = []
    data: list[int] = []
    at = 0
    for _ in range(count):
        table, table_size, _, _, _, name_size, extra = struct.unpack_from(">QIIBBHI", entries, at)
        at += (24 + extra + name_size + 7) & ~7
        tables.append(table)
        words = [q.u64(table + 8 * index) & OFFSET_MASK for index in range(table_size)]
        data += [word for word in words if word]
    return BitmapLayout(directory, tables, data, extension)


@pytest.fixture
def bitmaps(tmp_path: Path) -> Path:
    """4 KiB clusters, two enabled persistent bitmaps, then guest writes: each bitmap has a
    table and a data cluster (its bits set by the writes)."""
    path = tmp_path / "bm.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), "16M")
    qemu("qemu-img", "bitmap", "--add", str(path), "b0")
    qemu("qemu-img", "bitmap", "--add", "--granularity", "64k", str(path), "b1")
    qemu(
        "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", "-c", "write -P 7 1M 64k", str(path)
    )
    return path


def qemu_check(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)], capture_output=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_map_lists_the_bitmap_directory_tables_and_data(bitmaps: Path) -> None:
    q = Qcow2File(bitmaps)
    layout = bitmap_layout(q)
    assert len(layout.tables) == 2 and len(layout.data) == 2
    bits = q.cluster_bits
    device = open_image(bitmaps, read_only=True)
    try:
        meta = device.metadata
        assert meta.kind_of(layout.directory >> bits) is Kind.BITMAP_DIRECTORY
        assert {meta.kind_of(table >> bits) for table in layout.tables} == {Kind.BITMAP_TABLE}
        assert {meta.kind_of(data >> bits) for data in layout.data} == {Kind.BITMAP_DATA}
        everything = range(-(-q.path.stat().st_size >> bits))  # the directory ends the file
        marked = {c for c in everything if meta.kind_of(c) in BITMAP_KINDS}
        assert marked == layout.clusters(bits)
        assert meta.findings == []
    finally:
        device.close()
    # The oracle: with the autoclear bit clear, qemu-img ignores the bitmaps and reports
    # exactly their clusters as leaked.
    q.set_u64(AUTOCLEAR_AT, 0)
    assert qemu_check(bitmaps)["leaks"] == len(layout.clusters(bits))


@pytest.mark.parametrize("target", ["directory", "table", "data"])
@pytest.mark.parametrize("read_only", [False, True])
def test_l2_entry_pointing_at_a_bitmap_cluster(bitmaps: Path, target: str, read_only: bool) -> None:
    def patch(q: Qcow2File) -> None:
        layout = bitmap_layout(q)
        where = {
            "directory": layout.directory,
            "table": layout.tables[0],
            "data": layout.data[-1],
        }[target]
        q.set_u64(q.l2_entry_at(64 << 10), where | COPIED)

    attack = Attack(bitmaps, patch, read_only=read_only)
    attack.expect_eio(lambda: attack.device.pread(0, 128 << 10), "l2_entry")
    if read_only:
        attack.finish(marked=False)  # not a byte changed, qemu-img check as before
        return
    with pytest.raises(OSError) as caught:
        attack.device.pwrite(b"x" * 512, 4 << 20)
    assert caught.value.errno == errno.EROFS
    assert bytes(attack.device.pread(1 << 20, 4096)) == b"\x07" * 4096
    attack.device.close()
    # Only the header changed: the corrupt bit set, the autoclear bits cleared (nbdguard
    # does not maintain bitmaps, so it clears their bit at a writable open).
    expected = bytearray(attack.before)
    flags = int.from_bytes(expected[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8], "big")
    expected[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8] = (flags | CORRUPT_BIT).to_bytes(8, "big")
    expected[AUTOCLEAR_AT : AUTOCLEAR_AT + 8] = bytes(8)
    assert bitmaps.read_bytes() == bytes(expected)


def write_fresh_clusters(device: Qcow2Image, count: int) -> list[int]:
    """One 4 KiB write into each of `count` unallocated guest clusters; the guest offsets
    of those acknowledged (until the first error)."""
    done: list[int] = []
    for index in range(count):
        offset = (2 << 20) + index * (56 << 10)  # spread over new L2 tables too
        try:
            device.pwrite(bytes([index % 251 + 1]) * 4096, offset)
        except OSError as err:
            assert err.errno == errno.EIO
            break
        done.append(offset)
    device.flush()
    return done


def assert_bitmaps_untouched(
    path: Path, before: bytes, layout: BitmapLayout, done: list[int]
) -> None:
    q = Qcow2File(path)
    after = path.read_bytes()
    size = q.cluster_size
    for cluster in layout.clusters(q.cluster_bits):
        old = before[cluster * size : (cluster + 1) * size]  # the last one may be partial
        assert after[cluster * size : cluster * size + len(old)] == old
    hosts = {q.u64(q.l2_entry_at(offset)) & OFFSET_MASK for offset in done}
    assert not {host >> q.cluster_bits for host in hosts} & layout.clusters(q.cluster_bits)


def test_allocation_never_hands_out_a_bitmap_cluster(bitmaps: Path) -> None:
    q = Qcow2File(bitmaps)
    layout = bitmap_layout(q)
    before = bitmaps.read_bytes()
    device = open_image(bitmaps)
    try:
        done = write_fresh_clusters(device, 200)
    finally:
        device.close()
    assert len(done) == 200
    assert_bitmaps_untouched(bitmaps, before, layout, done)
    # No damage: only the bitmaps nbdguard made stale (by clearing their autoclear bit)
    # are leaked, as QEMU says of any program that does not maintain them.
    result = qemu_check(bitmaps)
    assert result["check-errors"] == 0 and result.get("corruptions", 0) == 0, result
    assert result["leaks"] == len(layout.clusters(q.cluster_bits)), result


def test_bitmap_clusters_claimed_free_are_never_allocated(bitmaps: Path) -> None:
    q = Qcow2File(bitmaps)
    layout = bitmap_layout(q)
    for cluster in layout.clusters(q.cluster_bits):
        q.set_refcount(cluster, 0)  # hostile: "free", yet named by the directory
    before = bitmaps.read_bytes()
    device = open_image(bitmaps)
    try:
        done = write_fresh_clusters(device, 200)
    finally:
        device.close()
    assert len(done) < 200  # the allocator met a "free" bitmap cluster: EIO, corrupt
    assert Qcow2File(bitmaps).u64(INCOMPATIBLE_AT) & CORRUPT_BIT
    assert_bitmaps_untouched(bitmaps, before, layout, done)


HOSTILE_BITMAPS: dict[str, tuple[Callable[[Qcow2File, BitmapLayout], None], str]] = {
    "table_over_l1": (lambda q, b: q.set_u64(b.directory, q.l1_offset), "overlaps"),
    "directory_past_end": (lambda q, b: q.set_u64(b.extension + 16, 1 << 40), "outside"),
    "directory_unaligned": (lambda q, b: q.set_u64(b.extension + 16, b.directory + 8), "at"),
    "data_reserved_bits": (lambda q, b: q.set_u64(b.tables[0], b.data[0] | 1 << 60), "invalid"),
    "data_is_l2": (lambda q, b: q.set_u64(b.tables[0], q.u64(q.l1_offset) & OFFSET_MASK), "l2"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_BITMAPS))
def test_impossible_bitmap_metadata_is_a_finding(bitmaps: Path, attack: str) -> None:
    """Not marked (the map stays true to the other metadata), reported, still served."""
    q = Qcow2File(bitmaps)
    layout = bitmap_layout(q)
    patch, words = HOSTILE_BITMAPS[attack]
    patch(q, layout)
    device = open_image(bitmaps, read_only=True)
    try:
        meta = device.metadata
        assert len(meta.findings) == 1 and words in meta.findings[0], meta.findings
        assert meta.kind_of(q.l1_offset >> q.cluster_bits) is Kind.L1
        l2 = q.u64(q.l1_offset) & OFFSET_MASK
        assert meta.kind_of(l2 >> q.cluster_bits) is Kind.L2
        assert bytes(device.pread(1 << 20, 4096)) == b"\x07" * 4096
    finally:
        device.close()
