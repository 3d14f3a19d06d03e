"""The bounded L2 cache: the cache alone (LRU of clean tables, dirty and pinned ones kept),
then a qcow2 image made by qemu-img with 512-byte clusters (each L2 table covers 32 KiB)
and a 1 MiB metadata_cache: one-byte writes that each need a new table stay within it at a
constant cost per write, write back in FLUSH's order, and leave an image `qemu-img check`
finds clean after a FLUSH and free of corruption (leaks at most) after a kill without one."""

from __future__ import annotations

import os
import queue
import random
import shutil
import subprocess
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdguard.config import ExportConfig
from nbdguard.storage.chain import Chain, resolve_chain
from nbdguard.storage.device import Buffer
from nbdguard.storage.pinned import OpenedFile
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.qcow2.l2cache import MIN_TABLES, L2Cache
from nbdguard.storage.qcow2.metadata import Kind
from nbdguard.storage.stack import build_device

MiB = 1 << 20
CLUSTER = 512
SPAN = CLUSTER // 8 * CLUSTER  # guest bytes one L2 table maps: 32 KiB
BUDGET = 1 * MiB  # metadata_cache: 3/4 for L2 tables, the rest for refcount blocks
L2_BUDGET = BUDGET * 3 // 4
TABLES = L2_BUDGET // CLUSTER  # 1536

qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


# The cache alone


class Loads:
    """A fake table loader that records what it was asked for."""

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def __call__(self, offset: int) -> array[int]:
        self.loaded.append(offset)
        return array("Q", [offset]) * 4


def cache_of(tables: int = MIN_TABLES) -> tuple[L2Cache, Loads]:
    loads = Loads()
    return L2Cache(tables * CLUSTER, CLUSTER, loads), loads


def test_clean_tables_are_evicted_least_recently_used_first() -> None:
    cache, loads = cache_of(8)
    for index in range(8):
        cache.get(index * CLUSTER)
    cache.get(0)  # now the most recently used
    cache.get(8 * CLUSTER)  # full: drops table 1, the oldest
    assert 1 * CLUSTER not in cache and 0 in cache
    assert (len(cache), cache.bytes, cache.evictions) == (8, 8 * CLUSTER, 1)
    loads.loaded.clear()
    cache.get(0)
    cache.get(1 * CLUSTER)
    assert loads.loaded == [1 * CLUSTER]  # a hit, then a reload of the evicted table


def test_dirty_tables_are_never_evicted_and_ask_for_write_back() -> None:
    cache, _ = cache_of(8)
    for index in range(6):
        cache.insert(index * CLUSTER, array("Q", [index]), dirty=True)
    for index in range(6, 20):
        cache.get(index * CLUSTER)  # clean ones come and go around the dirty ones
    assert all(index * CLUSTER in cache for index in range(6))
    assert len(cache) == 8 and cache.dirty_count == 6
    assert cache.over(2) == 0  # two clean slots left: evicting is enough
    assert cache.over(3) == 1  # one dirty table must be written first
    cache.mark_dirty(19 * CLUSTER)
    assert cache.over(2) == 1


def test_take_dirty_pins_until_written_and_orders_by_use() -> None:
    cache, _ = cache_of(8)
    for index in range(4):
        cache.insert(index * CLUSTER, array("Q", [index]), dirty=True)
    cache.get(0)  # table 0 is the most recently used dirty table
    taken = cache.take_dirty(2)
    assert [offset for offset, _ in taken] == [1 * CLUSTER, 2 * CLUSTER]  # the oldest two
    assert cache.dirty_count == 2 and cache.held == 4  # pinned: still not evictable
    for index in range(10, 30):
        cache.get(index * CLUSTER)
    assert 1 * CLUSTER in cache and 2 * CLUSTER in cache
    cache.mark_dirty(2 * CLUSTER)  # changed again while its write is in flight
    cache.written([1 * CLUSTER, 2 * CLUSTER], ok=True)
    assert cache.is_dirty(2 * CLUSTER) and not cache.is_dirty(1 * CLUSTER)
    assert cache.held == 3
    cache.get(40 * CLUSTER)  # the written table is the oldest clean one: evicted first
    assert 1 * CLUSTER not in cache


def test_a_failed_write_leaves_the_tables_dirty() -> None:
    cache, _ = cache_of(8)
    cache.insert(0, array("Q", [1]), dirty=True)
    cache.take_dirty()
    assert cache.dirty_count == 0 and cache.held == 1
    cache.written([0], ok=False)
    assert cache.is_dirty(0) and cache.held == 1
    assert [offset for offset, _ in cache.take_dirty()] == [0]


def test_random_use_never_exceeds_the_budget() -> None:
    """Callers that keep room (write back what `over` asks, as the image does) never see
    the cache pass its limit, whatever mix of loads, new tables and write-backs."""
    cache, _ = cache_of(64)
    rng = random.Random(5)
    for _ in range(20000):
        if excess := cache.over(4):
            cache.written([offset for offset, _ in cache.take_dirty(excess)], ok=True)
        for _ in range(rng.randint(0, 4)):  # what one piece of work may add
            offset = rng.randrange(400) * CLUSTER
            if rng.random() < 0.5 and offset not in cache:
                cache.insert(offset, array("Q", [0]), dirty=True)
            else:
                cache.get(offset)
                if rng.random() < 0.3:
                    cache.mark_dirty(offset)
        assert cache.bytes <= 64 * CLUSTER
    assert cache.peak == 64 and cache.evictions > 1000


# A real image


class RecordingHost(HostFile):
    """A host file that logs what is written where, and each sync, in order."""

    def __init__(self, file: OpenedFile) -> None:
        super().__init__(file)
        self.log: list[tuple[str, int, bytes]] = []  # ("write", offset, data) / ("sync", 0, b"")
        self.image: Qcow2Image | None = None

    def write(self, data: Buffer, offset: int) -> None:
        self.log.append(("write", offset, bytes(data)))
        super().write(data, offset)

    def sync(self) -> None:
        self.log.append(("sync", 0, b""))
        super().sync()


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def make_image(path: Path, tables: int) -> None:
    made = qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path),
                    str(tables * SPAN))  # fmt: skip
    assert made.returncode == 0, made.stderr


def make_populated(path: Path, tables: int, populated: int) -> None:
    """An image of `tables` L2 tables' span whose first cluster under each of the first
    `populated` tables holds data: the L1 names those, and a write elsewhere in one
    changes it in place."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as out:
        out.truncate(tables * SPAN)
        for index in range(populated):
            out.seek(index * SPAN)
            out.write(b"\x33")
    made = qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", str(raw),
                    str(path))  # fmt: skip
    assert made.returncode == 0, made.stderr


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[Chain, RecordingHost, Qcow2Image]]:
    """An image of 4000 tables' span, 3000 of them named by the L1, opened with a recording
    host file."""
    path = tmp_path / "top.qcow2"
    make_populated(path, 4000, 3000)
    chain = resolve_chain(ExportConfig(name="t", path=path, format="qcow2"))
    layer = chain.layers[0]
    assert layer.header is not None
    host = RecordingHost(layer.file)
    image = Qcow2Image(layer.header, host, None, None, metadata_cache=BUDGET)
    yield chain, host, image
    chain.close()


def metadata_bytes(image: Qcow2Image) -> int:
    """What the image's metadata caches hold: L2 tables and refcount blocks."""
    assert image.refcounts is not None
    return image.l2_cache.bytes + len(image.refcounts.blocks) * image.cluster_size


def kinds_of(image: Qcow2Image, log: list[tuple[str, int, bytes]]) -> list[str]:
    """Each logged event as sync / l1 / l2 / refcount / header / data (by the map)."""
    l1 = image.header.l1_table_offset
    names = []
    for event, offset, _ in log:
        kind = image.metadata.kind_of(offset // CLUSTER)
        if event == "sync":
            names.append("sync")
        elif l1 <= offset < l1 + len(image.l1) * 8:
            names.append("l1")
        elif kind is Kind.L2:
            names.append("l2")
        elif kind in (Kind.REFCOUNT_BLOCK, Kind.REFCOUNT_TABLE):
            names.append("refcount")
        elif offset < CLUSTER:
            names.append("header")
        else:
            names.append("data")
    return names


def assert_flush_order(kinds: list[str]) -> None:
    """Data and refcounts are synced before any L2 table is written, L2 tables are synced
    before the L1 is."""
    unsynced = {"data": False, "refcount": False, "l2": False, "header": False}
    for kind in kinds:
        if kind == "sync":
            unsynced = dict.fromkeys(unsynced, False)
        elif kind == "l2":
            assert not (unsynced["data"] or unsynced["refcount"] or unsynced["header"])
            unsynced["l2"] = True
        elif kind == "l1":
            assert not any(unsynced.values())
        else:
            unsynced[kind] = True


@qemu
def test_write_back_keeps_flush_order(
    opened: tuple[Chain, RecordingHost, Qcow2Image],
) -> None:
    _, host, image = opened
    for index in range(4000):  # a new data cluster in a named table, then in new tables
        image.pwrite(b"\x01", index * SPAN + 20000)
        image.wait_for_write_back()  # one thread at a time: the log is in issue order
        assert image.l2_cache.bytes <= L2_BUDGET
    assert image.write_backs >= 4
    kinds = kinds_of(image, host.log)
    assert "l2" in kinds and "l1" not in kinds  # written back, the L1 waits for a FLUSH
    image.flush()
    kinds = kinds_of(image, host.log)
    assert kinds.count("l1") == 1
    assert_flush_order(kinds)


@qemu
def test_durable_prefix_at_every_sync_of_a_write_back_is_consistent(
    opened: tuple[Chain, RecordingHost, Qcow2Image], tmp_path: Path
) -> None:
    """Power loss: what was synced survives, of what came after any part may. For the start
    and each sync of the first write-backs: the original file plus every write before it,
    and plus also only the L2 writes up to the next sync (the worst part to keep), must
    check without corruption."""
    _, host, image = opened
    original = (tmp_path / "top.qcow2").read_bytes()
    index = 0
    while image.write_backs < 2:
        image.pwrite(b"\x02", index * SPAN + 20000)
        image.wait_for_write_back()
        index += 1
    kinds = kinds_of(image, host.log)
    syncs = [at for at, kind in enumerate(kinds) if kind == "sync"]
    assert len(syncs) >= 4 and "l2" in kinds
    for sync, following in zip([0, *syncs], [*syncs, len(kinds)], strict=True):
        durable = [at for at in range(sync) if kinds[at] != "sync"]
        tables_next = [at for at in range(sync, following) if kinds[at] == "l2"]
        for state in (durable, durable + tables_next):
            crashed = tmp_path / "crash.qcow2"
            with crashed.open("wb") as out:
                out.write(original)
                for at in state:
                    _, offset, data = host.log[at]
                    out.seek(offset)
                    out.write(data)
            checked = qemu_img("check", "-f", "qcow2", str(crashed))
            assert checked.returncode in (0, 3), checked.stdout + checked.stderr  # 3: leaks
            assert "ERROR" not in checked.stdout


@qemu
def test_many_new_tables_stay_within_budget_at_constant_cost(tmp_path: Path) -> None:
    """20000 one-byte writes, each needing a new L2 table, no FLUSH: the cache holds at
    most 1 MiB of metadata and the time per write does not grow with the number written
    (before this cache, given a 2048-table limit: all 20000 tables held, and past 2048
    each write walked them all, from 30 µs to 9.5 ms a write). Then FLUSH: `qemu-img
    check` clean, and the image equals a raw file written the same way."""
    count = 20000
    path, raw = tmp_path / "top.qcow2", tmp_path / "model.raw"
    make_image(path, count)
    with raw.open("wb") as out:
        out.truncate(count * SPAN)
    device = build_device(ExportConfig(name="t", path=path, format="qcow2", metadata_cache=BUDGET))
    assert isinstance(device, Qcow2Image)
    fd = os.open(raw, os.O_WRONLY)
    block = 2500
    times: list[list[float]] = []
    try:
        for start in range(0, count, block):
            laps = []
            for index in range(start, start + block):
                byte = bytes([index % 251 + 1])
                offset = index * SPAN + (index * 37) % SPAN
                began = time.thread_time()  # CPU time: other load on the machine does not count
                device.pwrite(byte, offset)
                laps.append(time.thread_time() - began)
                os.pwrite(fd, byte, offset)
            times.append(laps)
            assert metadata_bytes(device) <= BUDGET
        assert device.l2_cache.peak * CLUSTER <= L2_BUDGET
        assert device.write_backs > 10
        device.flush()
    finally:
        os.close(fd)
        device.close()
    filled = times[2]  # the cache filled during the first 1536 writes
    last = times[-1]
    median = sorted(last)[block // 2] / sorted(filled)[block // 2]
    mean = sum(last) / sum(filled)
    assert median < 2 and mean < 3, (median, mean)
    checked = qemu_img("check", "-f", "qcow2", str(path))
    assert checked.returncode == 0, checked.stdout
    compared = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(raw))
    assert compared.returncode == 0, compared.stdout


@qemu
def test_kill_after_write_back_leaves_at_most_leaks(tmp_path: Path) -> None:
    """Writes written back but never flushed, then the descriptor closed without a flush
    (what a killed server leaves): `qemu-img check` finds leaks at most, no corruption."""
    path = tmp_path / "top.qcow2"
    make_image(path, 6000)
    commands = [arg for i in range(64) for arg in ("-c", f"write -P 0x33 {i * SPAN} 16k")]
    qemu_io = subprocess.run(  # tables the L1 already names: written back in place later
        ["qemu-io", "-f", "qcow2", *commands, str(path)], capture_output=True, check=False
    )
    assert qemu_io.returncode == 0
    chain = resolve_chain(ExportConfig(name="t", path=path, format="qcow2"))
    layer = chain.layers[0]
    assert layer.header is not None
    image = Qcow2Image(layer.header, HostFile(layer.file), None, None, metadata_cache=BUDGET)
    for index in range(6000):
        image.pwrite(b"\x44", index * SPAN + 20000)
    image.wait_for_write_back()
    assert image.write_backs > 3 and image.l2_cache.dirty_count > 0
    chain.close()  # no flush, no close(): the server is gone
    checked = qemu_img("check", "-f", "qcow2", str(path))
    assert checked.returncode in (0, 3), checked.stdout + checked.stderr
    assert "ERROR" not in checked.stdout and "corrupt" not in checked.stdout.lower()


@qemu
def test_write_backs_and_flushes_from_another_thread(tmp_path: Path) -> None:
    """FLUSH in a thread (as the dispatcher runs it) while writes go on and force
    write-backs: they take turns, and the image ends up equal to the raw model."""
    tables = 2600
    path, raw = tmp_path / "top.qcow2", tmp_path / "model.raw"
    make_image(path, tables)
    model = bytearray(tables * SPAN)
    device = build_device(ExportConfig(name="t", path=path, format="qcow2", metadata_cache=BUDGET))
    assert isinstance(device, Qcow2Image)
    asked: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: flush; False: end
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        while asked.get():
            device.flush()
            flushes += 1

    rng = random.Random(3)
    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for index in range(6000):
            offset = (index * 7919 % tables) * SPAN + rng.randrange(SPAN - 600)
            data = rng.randbytes(rng.choice((1, 100, 600)))
            device.pwrite(data, offset)
            model[offset : offset + len(data)] = data
            assert metadata_bytes(device) <= BUDGET
            if index % 2500 == 1800:
                asked.put(True)  # flushes while the next writes go on
    finally:
        asked.put(False)
        thread.join()
        device.close()
    assert flushes == 2 and device.write_backs > 0
    raw.write_bytes(model)
    checked = qemu_img("check", "-f", "qcow2", str(path))
    assert checked.returncode == 0, checked.stdout
    compared = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(raw))
    assert compared.returncode == 0, compared.stdout


@qemu
def test_long_zeroes_and_trims_make_room_piece_by_piece(tmp_path: Path) -> None:
    """A WRITE_ZEROES / TRIM over thousands of tables stays within the budget too."""
    tables = 3000
    path = tmp_path / "top.qcow2"
    make_image(path, tables)
    device = build_device(ExportConfig(name="t", path=path, format="qcow2", metadata_cache=BUDGET))
    assert isinstance(device, Qcow2Image)
    try:
        for index in range(tables):
            device.pwrite(b"\x55", index * SPAN)
        device.write_zeroes(0, tables * SPAN // 2, may_trim=False, fast=False)
        device.trim(tables * SPAN // 2, tables * SPAN // 2)
        assert device.l2_cache.peak * CLUSTER <= L2_BUDGET
        assert bytes(device.pread(0, 1)) == b"\x00"
        assert bytes(device.pread((tables - 1) * SPAN, 1)) == b"\x00"
        device.flush()
    finally:
        device.close()
    checked = qemu_img("check", "-f", "qcow2", str(path))
    assert checked.returncode == 0, checked.stdout


@qemu
def test_the_export_budget_is_shared_by_its_qcow2_layers(tmp_path: Path) -> None:
    """metadata_cache is per export: a two-layer qcow2 chain gives each layer half; with
    64 KiB clusters, 1 MiB each holds 12 L2 tables (3/4 of it), and writes across 40
    tables (each maps 512 MiB) stay within that and check clean after FLUSH."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    for made in (
        qemu_img("create", "-q", "-f", "qcow2", str(base), "20G"),
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)),
    ):
        assert made.returncode == 0, made.stderr
    device = build_device(ExportConfig(name="t", path=top, format="qcow2", metadata_cache=2 * MiB))
    assert isinstance(device, Qcow2Image) and isinstance(device.backing, Qcow2Image)
    assert device.l2_cache.limit == device.backing.l2_cache.limit == 12
    try:
        for index in range(40):
            device.pwrite(b"\x66", index * (512 * MiB) + 4096)
            assert bytes(device.pread(index * (512 * MiB) + 4096, 2)) == b"\x66\x00"
        assert device.l2_cache.peak <= 12 and device.write_backs > 0
        device.flush()
    finally:
        device.close()
    checked = qemu_img("check", "-f", "qcow2", str(top))
    assert checked.returncode == 0, checked.stdout
    alone = build_device(ExportConfig(name="t", path=base, format="qcow2"))
    assert isinstance(alone, Qcow2Image)
    assert alone.l2_cache.limit == (24 * MiB) // (64 << 10)  # the default, one layer
    alone.close()


class GatedHost(HostFile):
    """A host file whose syncs outside the main thread wait until the test opens a gate."""

    def __init__(self, file: OpenedFile) -> None:
        super().__init__(file)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def sync(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.entered.set()
            self.gate.wait()
        super().sync()


@qemu
def test_write_back_runs_beside_requests_not_in_them(tmp_path: Path) -> None:
    """Past half the cache a write-back starts in a worker thread; while its sync is held
    up, requests go on (none waits for it) until the cache really is full."""
    path = tmp_path / "top.qcow2"
    make_image(path, 3000)
    chain = resolve_chain(ExportConfig(name="t", path=path, format="qcow2"))
    layer = chain.layers[0]
    assert layer.header is not None
    host = GatedHost(layer.file)
    image = Qcow2Image(layer.header, host, None, None, metadata_cache=BUDGET)
    try:
        for index in range(TABLES // 2 + 1):
            image.pwrite(b"\x07", index * SPAN)
        image.pread(0, 1)  # the next request starts the write-back
        assert host.entered.wait(10)
        held = image.l2_cache.held
        for index in range(TABLES // 2 + 1, TABLES // 2 + 401):
            image.pwrite(b"\x08", index * SPAN)  # would hang if it waited for that sync
        assert image.write_backs == 0 and image.l2_cache.held == held + 400
        host.gate.set()
        image.wait_for_write_back()
        assert image.write_backs >= 1 and image.l2_cache.held <= held + 400 - TABLES // 4
        image.flush()
    finally:
        host.gate.set()
        image.close()
        chain.close()
    checked = qemu_img("check", "-f", "qcow2", str(path))
    assert checked.returncode == 0, checked.stdout
