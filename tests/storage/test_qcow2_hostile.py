"""Hostile qcow2 images: made by qemu-img, then one metadata entry patched. Each attack must
fail its request with EIO, mark the image corrupt (header bit, read-only from then on),
report it, never return metadata bytes, never grow the file, and leave `qemu-img check`
reporting exactly what it reported before nbdguard touched the image."""

from __future__ import annotations

import errno
import json
import random
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdguard.config import ExportConfig
from nbdguard.observability.reporter import ExportReporter
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.stack import build_device
from tests.storage.qcow2_patch import COMPRESSED, COPIED, OFFSET_MASK, Qcow2File

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

MiB = 1 << 20
CORRUPT_BIT = 1 << 1
INCOMPATIBLE_AT = 72


class Recorder(ExportReporter):
    def __init__(self) -> None:
        super().__init__("t")
        self.seen: list[dict[str, Any]] = []

    def qcow2_corrupt(
        self, *, kind: str, detail: str, guest_offset: int | None, host_offset: int | None
    ) -> None:
        self.seen.append({"kind": kind, "host_offset": host_offset})


def qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def check(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)], capture_output=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    result.pop("filename", None)
    return result


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M")
    qemu(
        "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", "-c", "write -P 7 1M 64k", str(path)
    )
    return path


class Attack:
    """Patch the image, open it in nbdguard, and afterwards judge what nbdguard did."""

    def __init__(self, path: Path, patch: Callable[[Qcow2File], None], *, read_only: bool = False):
        self.path = path
        self.q = Qcow2File(path)
        patch(self.q)
        self.before = path.read_bytes()
        self.before_check = check(path)
        self.reporter = Recorder()
        config = ExportConfig(name="t", path=path, format="qcow2", read_only=read_only)
        device = build_device(config, self.reporter)
        assert isinstance(device, Qcow2Image)
        self.device = device

    def expect_eio(self, call: Callable[[], object], kind: str) -> None:
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.EIO
        assert self.reporter.seen and self.reporter.seen[-1]["kind"] == kind

    def finish(self, *, marked: bool = True, intact: bool = True) -> None:
        # Read-only from now on; intact data is still served.
        if marked:
            with pytest.raises(OSError) as caught:
                self.device.pwrite(b"x" * 512, 4 * MiB)
            assert caught.value.errno == errno.EROFS
        if intact:  # (not when the one L2 table of this small image is what is broken)
            assert bytes(self.device.pread(MiB, 4096)) == b"\x07" * 4096
        self.device.close()
        after = self.path.read_bytes()
        assert len(after) == len(self.before)  # never grown
        expected = bytearray(self.before)
        if marked:
            flags = int.from_bytes(expected[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8], "big")
            expected[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8] = (flags | CORRUPT_BIT).to_bytes(
                8, "big"
            )
        assert after == bytes(expected)  # only the corrupt bit changed, nothing else
        assert check(self.path) == self.before_check


def test_compressed_descriptor_inside_cluster_0(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l2_entry_at(0), COMPRESSED | 0))
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "compressed_entry")
    attack.finish()


@pytest.mark.parametrize("target", ["l1", "refcount_table", "refcount_block", "l2"])
def test_l2_entry_pointing_at_metadata(image: Path, target: str) -> None:
    def patch(q: Qcow2File) -> None:
        where = {
            "l1": q.l1_offset,
            "refcount_table": q.refcount_table_offset,
            "refcount_block": q.u64(q.refcount_table_offset) & ~0x1FF,
            "l2": q.u64(q.l1_entry_at(0)) & OFFSET_MASK,
        }[target]
        q.set_u64(q.l2_entry_at(64 << 10), where | COPIED)

    attack = Attack(image, patch)
    attack.expect_eio(lambda: attack.device.pread(0, 128 << 10), "l2_entry")
    attack.finish()


def test_in_place_write_into_metadata_is_refused(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l2_entry_at(0), q.l1_offset | COPIED))
    attack.expect_eio(lambda: attack.device.pwrite(b"\xff" * 4096, 0), "l2_entry")
    attack.device.flush()
    attack.finish()


def test_l2_entry_far_past_end_of_file(image: Path) -> None:
    far = ((image.stat().st_size >> 16) + (1 << 14)) << 16  # 1 GiB past the end
    attack = Attack(image, lambda q: q.set_u64(q.l2_entry_at(0), far | COPIED))
    attack.expect_eio(lambda: attack.device.pwrite(b"\xff" * 4096, 0), "l2_entry")
    attack.finish()


def test_l1_entry_pointing_at_refcount_table(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l1_offset, q.refcount_table_offset | COPIED))
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "l1_entry")
    attack.finish(intact=False)


def test_l1_entry_with_reserved_bits(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l1_offset, q.u64(q.l1_offset) | 1 << 60))
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "l1_entry")
    attack.finish(intact=False)


def test_refcount_claiming_metadata_free(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_refcount(q.l1_offset >> q.cluster_bits, 0))
    # Allocating needs a new L2 table: the allocator meets the "free" L1 cluster.
    attack.expect_eio(
        lambda: attack.device.pwrite(b"\xff" * 4096, 8 * MiB), "refcount_metadata_free"
    )
    attack.finish()


def test_refcount_decrement_below_zero(image: Path) -> None:
    def patch(q: Qcow2File) -> None:
        data = q.u64(q.l2_entry_at(0)) & OFFSET_MASK
        q.set_refcount(data >> q.cluster_bits, 0)

    attack = Attack(image, patch)
    attack.expect_eio(lambda: attack.device.trim(0, 64 << 10), "refcount_zero")
    attack.device.flush()
    attack.finish()


def test_read_only_image_reports_but_is_not_changed(image: Path) -> None:
    attack = Attack(
        image, lambda q: q.set_u64(q.l2_entry_at(0), q.l1_offset | COPIED), read_only=True
    )
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "l2_entry")
    attack.finish(marked=False)


def test_acknowledged_writes_survive_corruption(image: Path) -> None:
    q = Qcow2File(image)
    q.set_u64(q.l2_entry_at(0), q.refcount_table_offset | COPIED)
    reporter = Recorder()
    device = build_device(ExportConfig(name="t", path=image, format="qcow2"), reporter)
    device.pwrite(b"\xab" * 65536, 4 * MiB)  # acknowledged, metadata not yet flushed
    with pytest.raises(OSError):
        device.pread(0, 4096)
    device.close()
    out = image.with_suffix(".raw")
    qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out))
    assert out.read_bytes()[4 * MiB : 4 * MiB + 65536] == b"\xab" * 65536
    assert Qcow2File(image).u64(INCOMPATIBLE_AT) & CORRUPT_BIT


@pytest.fixture
def compressed(tmp_path: Path) -> Path:
    raw = tmp_path / "a.raw"
    qemu("qemu-img", "create", "-q", "-f", "raw", str(raw), "16M")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 128k", "-c", "write -P 7 1M 64k", str(raw))
    path = tmp_path / "c.qcow2"
    qemu("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    return path


def test_compressed_descriptor_past_end_of_file(compressed: Path) -> None:
    def patch(q: Qcow2File) -> None:
        word = q.u64(q.l2_entry_at(0))
        shift = 62 - (q.cluster_bits - 8)
        far = (compressed.stat().st_size + (1 << 30)) & ((1 << shift) - 1)
        q.set_u64(q.l2_entry_at(0), (word & ~((1 << shift) - 1)) | far)

    attack = Attack(compressed, patch)
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "compressed_entry")
    attack.finish()


def test_compressed_descriptor_over_the_l1_table(compressed: Path) -> None:
    def patch(q: Qcow2File) -> None:
        word = q.u64(q.l2_entry_at(0))
        shift = 62 - (q.cluster_bits - 8)
        q.set_u64(q.l2_entry_at(0), (word & ~((1 << shift) - 1)) | q.l1_offset)

    attack = Attack(compressed, patch)
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "compressed_entry")
    attack.finish()


# Bounded allocation: refcount structures that claim everything


def fill_refcounts(q: Qcow2File, *, blocks: int, leaked: int, sparse_to: int = 0) -> None:
    """Plant `leaked` unreferenced clusters and `blocks` more refcount blocks (table entries
    1..blocks) in which every entry is 1, and set every zero entry of block 0 to 1: no
    refcount entry anywhere says "free". With `sparse_to`, the file is then extended (a
    hole) to that size, so the full blocks also describe clusters inside the file."""
    width = (1 << q.refcount_order) // 8
    ones = (1).to_bytes(width, "big") * (q.cluster_size // width)
    first = -(-q.path.stat().st_size // q.cluster_size) + leaked
    assert blocks < q.refcount_table_clusters * q.cluster_size // 8
    block0 = q.u64(q.refcount_table_offset) & ~0x1FF
    with q.path.open("r+b") as file:
        file.truncate(first * q.cluster_size)
        for index in range(blocks):
            file.seek((first + index) * q.cluster_size)
            file.write(ones)
            q_offset = q.refcount_table_offset + 8 * (index + 1)
            file.seek(q_offset)
            file.write(((first + index) * q.cluster_size).to_bytes(8, "big"))
        file.seek(block0)
        data = bytearray(file.read(q.cluster_size))
        for at in range(0, len(data), width):
            if not any(data[at : at + width]):
                data[at : at + width] = (1).to_bytes(width, "big")
        file.seek(block0)
        file.write(data)
        if sparse_to:
            file.truncate(sparse_to)


def damage(result: dict[str, Any]) -> tuple[int, int, int]:
    return result.get("corruptions", 0), result.get("leaks", 0), result.get("check-errors", 0)


def timed_write(device: Qcow2Image, data: bytes, offset: int) -> float:
    """CPU seconds of one guest write."""
    start = time.process_time()
    device.pwrite(data, offset)
    return time.process_time() - start


def test_full_refcount_blocks_do_not_stall_allocation(image: Path) -> None:
    """Every refcount entry of 200 blocks is non-zero (and two clusters inside the file are
    leaked): an allocating write takes the first cluster past the end of the file at once,
    instead of walking 6.5 million claims; the claim on that cluster is overwritten."""
    fill_refcounts(Qcow2File(image), blocks=200, leaked=2)
    before = check(image)
    assert damage(before) == (0, 2, 0)
    size = image.stat().st_size
    reporter = Recorder()
    device = build_device(ExportConfig(name="t", path=image, format="qcow2"), reporter)
    assert isinstance(device, Qcow2Image) and device.refcounts is not None
    assert timed_write(device, b"\xab" * 65536, 8 * MiB) < 0.05
    assert timed_write(device, b"\xcd" * 65536, 8 * MiB + 65536) < 0.05
    assert device.refcounts.reclaimed >= 2
    assert bytes(device.pread(8 * MiB, 65536)) == b"\xab" * 65536
    device.close()
    assert not reporter.seen and image.stat().st_size == size + 2 * 65536
    assert damage(check(image)) == damage(before)  # only the planted leaks
    assert bytes(device_view(image, 8 * MiB, 2 * 65536)) == b"\xab" * 65536 + b"\xcd" * 65536


def device_view(path: Path, offset: int, length: int) -> bytes:
    out = path.with_suffix(".raw")
    qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out))
    return out.read_bytes()[offset : offset + length]


def test_full_refcount_blocks_over_a_sparse_file_are_scanned_in_slices(image: Path) -> None:
    """A 64 GiB sparse file whose 32 blocks say every cluster in it is used: no write spends
    more than its slice of the scan; writes meanwhile go past the end of the file, and the
    cursor keeps what was scanned, so the scan ends after a few writes."""
    fill_refcounts(Qcow2File(image), blocks=40, leaked=0, sparse_to=64 << 30)
    before = check(image)
    device = build_device(ExportConfig(name="t", path=image, format="qcow2"))
    assert isinstance(device, Qcow2Image) and device.refcounts is not None
    refcounts = device.refcounts
    times = []
    for index in range(8):
        times.append(timed_write(device, bytes([index + 1]) * 65536, (index + 2) * MiB))
    print("\nCPU ms per write:", [round(t * 1000, 2) for t in times])
    assert max(times) < 0.05
    assert refcounts.cursor == refcounts.file_clusters  # the whole file was scanned once
    assert refcounts.scanned == refcounts.file_clusters - 1
    device.close()
    assert damage(check(image)) == damage(before)
    view = device_view(image, 0, 16 * MiB)
    for index in range(8):
        at = (index + 2) * MiB
        assert view[at : at + 65536] == bytes([index + 1]) * 65536


@pytest.fixture
def small_clusters(tmp_path: Path) -> Path:
    path = tmp_path / "s.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "16M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4k", str(path))
    return path


def test_refcount_table_entries_sharing_a_block(small_clusters: Path) -> None:
    """Table entry 1 names block 0 again: counting a cluster there would overwrite the
    counts of clusters 0..255 with a stale copy. The file is made to end where block 1
    begins (every cluster counted), so the first allocation meets the shared entry."""

    def patch(q: Qcow2File) -> None:
        per_block = q.cluster_size * 8 >> q.refcount_order
        with q.path.open("r+b") as file:
            file.truncate(per_block * q.cluster_size)
        for cluster in range(per_block):
            if not q.refcount(cluster):
                q.set_refcount(cluster, 1)  # leaked: nothing inside the file is free
        q.set_u64(q.refcount_table_offset + 8, q.u64(q.refcount_table_offset))

    attack = Attack(small_clusters, patch)
    attack.expect_eio(lambda: attack.device.pwrite(b"\xff" * 512, 8192), "refcount_table_entry")
    attack.device.close()
    after = attack.path.read_bytes()
    assert len(after) == len(attack.before)
    assert Qcow2File(attack.path).u64(INCOMPATIBLE_AT) & CORRUPT_BIT
    assert check(attack.path) == attack.before_check


# Compressed clusters: bounded to exactly one cluster of output


def plant_stream(q: Qcow2File, guest_offset: int, stream: bytes) -> None:
    """Append a compressed stream at the end of the file (sector-aligned, the file padded
    to a whole cluster) and point the guest cluster's descriptor at it."""
    size = q.path.stat().st_size
    at = -(-size // 512) * 512
    sectors = -(-len(stream) // 512)
    shift = 62 - (q.cluster_bits - 8)
    assert sectors <= 1 << (q.cluster_bits - 8)
    with q.path.open("r+b") as file:
        file.seek(at)
        file.write(stream)
        file.truncate(-(-(at + sectors * 512) // q.cluster_size) * q.cluster_size)
    q.set_u64(q.l2_entry_at(guest_offset), COMPRESSED | (sectors - 1) << shift | at)


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -12)
    return compressor.compress(data) + compressor.flush()


def compressed_attack(path: Path, stream: bytes) -> None:
    q = Qcow2File(path)
    plant_stream(q, 0, stream)
    before = path.read_bytes()
    device = build_device(ExportConfig(name="t", path=path, format="qcow2"))
    start = time.process_time()
    with pytest.raises(OSError) as caught:
        device.pread(0, 4096)
    assert time.process_time() - start < 0.05
    assert caught.value.errno == errno.EIO
    # The other clusters still read, and the image stays writable: a bad stream is data
    # the guest cannot read (as in QEMU), not metadata the engine cannot trust.
    assert bytes(device.pread(MiB, 4096)) == b"\x07" * 4096
    assert bytes(device.pread(64 << 10, 4096)) == b"\x5a" * 4096
    device.close()
    assert path.read_bytes() == before


def test_compressed_stream_inflating_past_one_cluster(compressed: Path) -> None:
    compressed_attack(compressed, deflate(bytes(64 * MiB)))  # 1024 clusters in a 64 KiB stream


def test_compressed_stream_one_byte_too_long(compressed: Path) -> None:
    compressed_attack(compressed, deflate(b"\x5a" * (65536 + 1)))


def test_truncated_compressed_stream(compressed: Path) -> None:
    stream = deflate(random.Random(1).randbytes(32768) * 2)
    compressed_attack(compressed, stream[: len(stream) // 2])


def test_compressed_stream_of_garbage(compressed: Path) -> None:
    compressed_attack(compressed, b"\xff" * 4096)
