"""Allocation and the refcount-block cache of the qcow2 engine: bulk flags agree with entry
by entry reads at every refcount width, freed clusters are found again without rescans,
sequential allocation stays linear, and a small cache budget changes nothing on disk but
how early blocks are written."""

from __future__ import annotations

import contextlib
import random
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nbdguard.config import ExportConfig
from nbdguard.errors import Qcow2Corrupt
from nbdguard.storage.qcow2 import refcounts as refcounts_module
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.qcow2.metadata import Kind, MetadataMap
from nbdguard.storage.qcow2.refcounts import FreeRanges, Refcounts, used_flags
from nbdguard.storage.stack import build_device
from tests.storage.test_qcow2_hostile import check, qemu
from tests.storage.test_qcow2_image import (
    apply_workload,
    check_and_compare,
    workload_while_flushing,
)

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

KiB = 1 << 10
MiB = 1 << 20


def naive_flags(block: bytes, bits: int) -> bytes:
    """The reference: each entry read on its own (LSB-first below a byte, as the spec)."""
    out = bytearray()
    for slot in range(len(block) * 8 // bits):
        if bits >= 8:
            width = bits // 8
            value = int.from_bytes(block[slot * width : (slot + 1) * width], "big")
        else:
            bit = slot * bits
            value = (block[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)
        out.append(value != 0)
    return bytes(out)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_used_flags_agree_with_entry_by_entry_reads(bits: int) -> None:
    rng = random.Random(bits)
    for density in (0.0, 0.02, 0.5, 0.98, 1.0):
        # Sparse non-zero bytes: entries of every kind (zero, one byte set, several set).
        block = bytes(rng.randrange(1, 256) if rng.random() < density else 0 for _ in range(512))
        flags = used_flags(bytearray(block), bits)
        assert [f != 0 for f in flags] == [f != 0 for f in naive_flags(block, bits)]


def test_free_ranges_merge_split_and_fit() -> None:
    free = FreeRanges()
    free.add(10, 1)
    free.add(12, 1)
    free.add(11, 1)  # joins both neighbours
    assert len(free) == 1 and free.clusters() == 3
    free.add(20, 8)
    assert free.take(5) == 20  # no run of 4..7: the run of 8 is split
    assert free.take(3) == 10  # runs of 2..3 are tried first: the first one long enough
    assert free.take(3) == 25  # what the take of 5 left
    assert free.take(1) is None and len(free) == 0
    free.add(40, 2)
    free.add(50, 3)
    assert free.take(3) == 50  # the run of 2 in the same class is passed over
    assert free.take(2) == 40


# Images


def make_image(tmp_path: Path, *, cluster: int, refcount_bits: int = 16) -> Path:
    path = tmp_path / f"c{cluster}-r{refcount_bits}.qcow2"
    options = f"cluster_size={cluster},refcount_bits={refcount_bits}"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), "64M")
    return path


def open_image(path: Path) -> Qcow2Image:
    device = build_device(ExportConfig(name="t", path=path, format="qcow2"))
    assert isinstance(device, Qcow2Image)
    return device


def guest_view(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def assert_clean(path: Path) -> None:
    result = check(path)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result


@needs_qemu
@pytest.mark.parametrize("refcount_bits", [1, 4, 8, 16, 64])
def test_holes_inside_the_file_are_reused(tmp_path: Path, refcount_bits: int) -> None:
    """Clusters qemu freed inside the file are found by the scan, and runs this engine
    frees are found again through the free index: the file does not grow."""
    path = make_image(tmp_path, cluster=4096, refcount_bits=refcount_bits)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "discard 256k 256k", str(path))
    size = path.stat().st_size
    device = open_image(path)
    # A new L2 table and 63 data clusters: exactly the 64 clusters qemu freed.
    device.pwrite(b"\x02" * (252 * KiB), 4 * MiB)
    device.trim(0, 128 * KiB)
    device.flush()  # the trim's frees take effect: they go to the free index
    device.pwrite(b"\x03" * (124 * KiB), 8 * MiB)  # again a table and 31 clusters
    assert device.refcounts is not None and device.refcounts.free.clusters() == 0
    device.close()
    assert path.stat().st_size == size
    assert_clean(path)
    view = guest_view(path)
    assert view[128 * KiB : 256 * KiB] == b"\x01" * (128 * KiB)
    assert view[4 * MiB : 4 * MiB + 252 * KiB] == b"\x02" * (252 * KiB)
    assert view[8 * MiB : 8 * MiB + 124 * KiB] == b"\x03" * (124 * KiB)
    assert view[: 128 * KiB] == bytes(128 * KiB)


def chunk_times(refcounts: Refcounts, total: int, chunk: int) -> list[float]:
    times = []
    for _ in range(total // chunk):
        start = time.process_time()
        for _ in range(chunk):
            refcounts.allocate(1)
        times.append(time.process_time() - start)
    return times


@needs_qemu
@pytest.mark.parametrize("cluster", [512, 65536])
def test_sequential_allocation_is_linear(tmp_path: Path, cluster: int) -> None:
    """10000 single-cluster allocations: the entries examined stay bounded by the file's
    own clusters (the cursor never goes back), and the last thousand cost about what the
    first did."""
    path = make_image(tmp_path, cluster=cluster)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", str(path))
    device = open_image(path)
    refcounts = device.refcounts
    assert refcounts is not None
    times = chunk_times(refcounts, 10000, 1000)
    print(f"\ncluster {cluster}: ms per 1000 allocations", [round(t * 1000, 2) for t in times])
    assert refcounts.scanned <= refcounts.file_clusters
    first, last = statistics.median(times[:3]), statistics.median(times[-3:])
    assert last <= 3 * first + 0.005
    device.close()
    result = check(path)
    assert result.get("corruptions", 0) == 0  # the 10000 clusters are leaks, nothing worse


@needs_qemu
def test_a_small_cache_budget_writes_back_and_stays_consistent(tmp_path: Path) -> None:
    """512-byte clusters: a refcount block counts 256 clusters, so 8 MiB of writes dirties
    64 blocks and grows the table; with room for 4 blocks the cache never holds many more,
    and the image is exactly what it would be with an unbounded cache."""
    path = make_image(tmp_path, cluster=512)
    device = open_image(path)
    refcounts = Refcounts(device.host, device.header, device.metadata, cache_bytes=4 * 512)
    device.refcounts = refcounts
    model = bytearray(64 * MiB)
    rng = random.Random(7)
    most = 0
    for step in range(64):
        offset = step * 128 * KiB
        data = bytes([rng.randrange(1, 256)]) * (128 * KiB)
        device.pwrite(data, offset)
        model[offset : offset + len(data)] = data
        if step % 16 == 15:
            device.trim(offset - 64 * KiB, 32 * KiB)  # frees spread over other blocks
            model[offset - 64 * KiB : offset - 32 * KiB] = bytes(32 * KiB)
            device.flush()
        most = max(most, len(refcounts.blocks))
    assert most <= 2 * refcounts.cache_limit + 2
    assert refcounts.written_back >= 64
    assert len(refcounts.table) > 64  # the table moved while blocks were written back
    device.close()
    assert_clean(path)
    assert guest_view(path) == bytes(model)


@needs_qemu
def test_write_back_during_a_flush_is_not_overtaken(tmp_path: Path) -> None:
    """A block written back while a flush holds an older copy of it is dirty again once
    that flush ends, so its newest counts reach the disk after the old ones."""
    path = make_image(tmp_path, cluster=512)
    device = open_image(path)
    refcounts = Refcounts(device.host, device.header, device.metadata, cache_bytes=4 * 512)
    device.refcounts = refcounts
    device.pwrite(b"\x01" * 512, 0)
    writes = refcounts.take_increments()  # a flush captured block 0 ...
    index = 0
    assert index in writes.dirty_indexes
    for step in range(1, 12):  # ... meanwhile block 0 changes, new blocks fill the cache,
        device.pwrite(bytes([step]) * (128 * KiB), step * 128 * KiB)  # it is written back
    assert index not in refcounts.dirty_blocks and index in refcounts._rewritten
    refcounts.write(writes)  # the flush's older copy lands last
    refcounts.apply_frees(writes.frees)
    assert index in refcounts.dirty_blocks
    device.close()
    assert_clean(path)


@needs_qemu
def test_a_failed_flush_gives_its_blocks_back(tmp_path: Path) -> None:
    path = make_image(tmp_path, cluster=4096)
    device = open_image(path)
    refcounts = device.refcounts
    assert refcounts is not None
    device.pwrite(b"\x01" * 4096, 0)
    writes = refcounts.take_increments()
    assert not refcounts.dirty_blocks
    refcounts.give_back(writes)
    assert set(refcounts.dirty_blocks) == writes.dirty_indexes
    device.close()
    assert_clean(path)


def tiny_cache(device: Qcow2Image) -> Refcounts:
    """Room for 4 refcount blocks: every workload below writes blocks back early."""
    refcounts = Refcounts(device.host, device.header, device.metadata, cache_bytes=0)
    device.refcounts = refcounts
    return refcounts


@needs_qemu
@pytest.mark.parametrize("refcount_bits", [1, 16, 64])
def test_random_workload_with_a_tiny_cache(tmp_path: Path, refcount_bits: int) -> None:
    path = tmp_path / "top.qcow2"
    options = f"cluster_size=512,refcount_bits={refcount_bits}"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), "12M")
    device = open_image(path)
    refcounts = tiny_cache(device)
    model = bytearray(12 * MiB)
    try:
        apply_workload(device, model, seed=refcount_bits, ops=300)
    finally:
        device.close()
    assert refcounts.written_back > 0
    check_and_compare(path, bytes(model))


@needs_qemu
def test_flushes_in_another_thread_with_a_tiny_cache(tmp_path: Path) -> None:
    """Write-back races the flush thread's older copies: the image stays consistent."""
    path = tmp_path / "top.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "12M")
    device = open_image(path)
    refcounts = tiny_cache(device)
    model = bytearray(12 * MiB)
    try:
        flushes = workload_while_flushing(device, model, seed=5, ops=400)
    finally:
        device.close()
    assert flushes > 5 and refcounts.written_back > 0
    check_and_compare(path, bytes(model))


class MemoryHost:
    """Just what Refcounts uses of a HostFile, over bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length]).ljust(length, b"\0")

    def write(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        self.data[len(self.data) : end] = bytes(max(0, end - len(self.data)))
        self.data[offset:end] = data
        self.size = max(self.size, end)

    def sync(self) -> None:
        pass


def memory_refcounts(bits: int, values: list[int], blocks: int) -> tuple[Refcounts, list[int]]:
    """512-byte clusters: header, table (cluster 1), `blocks` blocks (2..), the file as long
    as `values` (one refcount per cluster; the metadata clusters get 1). Entries past the
    end of the file are 0, so that taking them changes nothing but the frontier."""
    per_block = 512 * 8 // bits
    assert 2 + blocks < len(values) <= blocks * per_block and blocks <= 64
    values = [1] * (2 + blocks) + values[2 + blocks :]
    image = bytearray(len(values) * 512)
    metadata = MetadataMap(9)
    for index in range(blocks):
        where = (2 + index) * 512
        image[512 + 8 * index : 520 + 8 * index] = where.to_bytes(8, "big")
        metadata.add(2 + index, Kind.REFCOUNT_BLOCK)
        for slot in range(per_block):
            cluster = index * per_block + slot
            value = values[cluster] if cluster < len(values) else 0
            if bits >= 8:
                width = bits // 8
                at = where + slot * width
                image[at : at + width] = value.to_bytes(width, "big")
            else:
                at = where + slot * bits // 8
                image[at] |= value << (slot * bits % 8)
    header = SimpleNamespace(
        cluster_bits=9,
        cluster_size=512,
        refcount_order=bits.bit_length() - 1,
        refcount_table_offset=512,
        refcount_table_clusters=1,
    )
    host = MemoryHost(bytes(image))
    return Refcounts(host, header, metadata), values  # type: ignore[arg-type]


def naive_take(values: list[int], cursor: int, count: int) -> tuple[int | None, int]:
    """First fit from the cursor inside the file; (start or None, the cursor after)."""
    run = 0
    for cluster in range(cursor, len(values)):
        run = run + 1 if values[cluster] == 0 else 0
        if run == count:
            return cluster - count + 1, cluster + 1
    return None, len(values) - run


@pytest.mark.parametrize("bits", [1, 4, 16, 64])
def test_scan_is_first_fit_from_the_cursor(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a first fit entry by entry, with windows of 7 entries: runs carried across
    windows and blocks, trailing runs kept for the next call, the frontier when none fits."""
    monkeypatch.setattr(refcounts_module, "SCAN_WINDOW", 7)
    rng = random.Random(bits)
    per_block = 512 * 8 // bits
    length = min(4 * per_block, 3000) - rng.randrange(per_block // 2)
    blocks = min(64, -(-(length + 600) // per_block))  # the frontier's clusters too
    values: list[int] = []
    while len(values) < length:  # stretches of mostly used and of mostly free clusters
        free = rng.choice([0.3, 0.95])
        for _ in range(rng.randrange(1, 60)):
            values.append(0 if rng.random() < free else rng.randrange(1, 1 << min(bits, 8)))
    values = values[:length]
    refcounts, values = memory_refcounts(bits, values, blocks)
    cursor, frontier = 1, len(values)
    past_end = 0
    while past_end < 20:  # until the scan is long done
        count = rng.choice([1, 1, 2, 3, 5, 9, 16, 23])
        expected, cursor_after = naive_take(values, cursor, count)
        got = refcounts.allocate(count) >> 9
        if expected is None:
            assert got == frontier
            frontier += count
            past_end += 1
        else:
            assert got == expected
            for cluster in range(got, got + count):
                values[cluster] = 1
        cursor = cursor_after
        assert refcounts.cursor == cursor
    assert [refcounts.get(c) != 0 for c in range(len(values))] == [v != 0 for v in values]
    assert refcounts.reclaimed == 0


@pytest.mark.parametrize("bits", [1, 16, 64])
def test_frees_in_bulk_match_frees_one_by_one(bits: int) -> None:
    """Runs of refcount-1 clusters, shared clusters, clusters freed twice, a freed L2 table
    and a snapshot table (never freed) amid the runs: the counts, the free index and the
    error are what decrementing one cluster at a time gives."""
    rng = random.Random(bits)
    per_block = 512 * 8 // bits
    length = min(3 * per_block, 3000)
    blocks = -(-length // per_block)
    top = min(3, (1 << bits) - 1)
    values = [min(rng.choice([1, 1, 1, 1, 2, 3]), top) for _ in range(length)]
    refcounts, values = memory_refcounts(bits, values, blocks)
    l2, snapshot = length // 3, length // 2
    refcounts.metadata.add(l2, Kind.L2)
    refcounts.metadata.add(snapshot, Kind.SNAPSHOT_TABLE)
    values[l2] = values[snapshot] = 1
    refcounts.set(l2, 1)
    refcounts.set(snapshot, 1)
    refcounts.cursor = length // 4  # frees below it go to the index, above it do not
    frees = [(c << 9, 1) for c in range(5, length) if rng.random() < 0.7]
    frees += [(c << 9, 1) for c in rng.sample(range(5, length), 40)]  # some twice
    frees.append((10 << 9, 30))
    rng.shuffle(frees)
    expected_error = False
    expected_free = set()
    for offset, count in sorted(frees):
        for cluster in range(offset >> 9, (offset >> 9) + count):
            if values[cluster] == 0 or cluster == snapshot:
                expected_error = True
                continue
            values[cluster] -= 1
            if values[cluster] == 0 and not refcounts.cursor <= cluster < length:
                expected_free.add(cluster)
    with pytest.raises(Qcow2Corrupt) if expected_error else contextlib.nullcontext():
        refcounts.apply_frees(frees)
    assert [refcounts.get(c) for c in range(length)] == values
    assert refcounts.free.clusters() == len(expected_free)
    taken = {refcounts.free.take(1) for _ in expected_free}
    assert taken == expected_free
    assert not refcounts.metadata.is_metadata(l2) and refcounts.metadata.is_metadata(snapshot)
