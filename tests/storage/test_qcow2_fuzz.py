"""A metadata fuzzer for the qcow2 engine: small images made by qemu-img (512 B, 4 KiB and
64 KiB clusters, with and without a backing file, with and without extended L2 entries),
a few L1/L2/refcount-table/refcount-block words replaced by hypothesis, then random guest
reads, writes, zeroes, trims and flushes through the export's own stack.

Invariants, checked after every request:
- only the documented failures: OSError with EIO/EROFS/EPERM/ENOSPC (Qcow2Corrupt is one),
  ENOTSUP for a fast zero that would not be fast, ExportOpenError at open;
- every request takes under a second of CPU;
- reads return guest bytes only: every byte the guest, the backing file or qemu-io wrote
  is zero or one of a few fill values no metadata word is made of, and a reply piece
  holding any other byte must not be the bytes of a cluster the metadata map lists (a
  table a patch orphaned is a leaked data cluster, whose stale bytes may be read);
- the header's fixed fields, extensions and backing name never change (only the corrupt
  bit, and the refcount table's place when the engine moves it);
- a request other than FLUSH changes no byte of a cluster the metadata map lists (the
  engine writes metadata only when it flushes), and a FLUSH writes only clusters that are
  metadata before or after it;
- without a patch, reads return exactly what a byte model of the disk holds;
- on a sample, `qemu-img check` counts no more corruptions after nbdguard closed the image
  than right after the patch.
Each patched entry is read first and last. CI runs 320 examples (seeded per layout, so a
failure reproduces); `--runslow` runs 3200 with fresh randomness. Known engine bugs are
pinned by deterministic tests at the end (AVOID_KNOWN_BUGS steers around them if needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from nbdguard.config import ExportConfig
from nbdguard.errors import ExportOpenError
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.qcow2.metadata import Kind
from nbdguard.storage.stack import build_device
from tests.storage.qcow2_patch import COMPRESSED, COPIED, OFFSET_MASK, Qcow2File

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io missing",
)

CI_EXAMPLES = 40  # per configuration: 8 configurations
SLOW_EXAMPLES = 400
CPU_BOUND = 1.0  # seconds of CPU per request
CHECK_EVERY = 8  # qemu-img check on about one example in CHECK_EVERY

# Guest fills: not 0x00/0x01/0x80/0xFF and not ASCII, so no L1/L2/refcount word, header
# field, extension or backing name is made only of them (and zeros).
FILLS = (0xA5, 0xC3, 0x96, 0x69)
GUEST_BYTES = bytes(FILLS) + b"\0"
ALLOWED_ERRNOS = {errno.EIO, errno.EROFS, errno.EPERM, errno.ENOSPC}
CORRUPT_BIT = 1 << 1
ZERO_FLAG = 1
RESERVED_L2 = 1 << 60
INCOMPATIBLE_AT = 72
REFTABLE_FIELDS = slice(48, 60)  # refcount_table_offset, refcount_table_clusters


@dataclass(frozen=True)
class Layout:
    cluster: int
    backing: bool
    extended: bool

    @property
    def name(self) -> str:
        kib = f"{self.cluster >> 10}k" if self.cluster >= 1024 else f"{self.cluster}"
        return f"{kib}{'-backing' if self.backing else ''}{'-extl2' if self.extended else ''}"

    @property
    def size(self) -> int:
        return {512: 256 << 10, 4096: 8 << 20, 65536: 4 << 20}[self.cluster]

    @property
    def l2_span(self) -> int:
        entries = self.cluster // (16 if self.extended else 8)
        return entries * self.cluster


LAYOUTS = [
    Layout(cluster, backing, extended)
    for cluster in (512, 4096, 65536)
    for backing in (False, True)
    for extended in ((False, True) if cluster >= 16384 else (False,))
]


def qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def corruptions(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)], capture_output=True
    )
    try:
        result: dict[str, Any] = json.loads(out.stdout)
    except json.JSONDecodeError:
        return 1 << 30  # not even checkable: as bad as it gets
    return int(result.get("corruptions", 0)) + int(result.get("check-errors", 0))


@dataclass
class Base:
    """A pristine image (and its backing file) and the guest view qemu-img gives it."""

    layout: Layout
    directory: Path
    image: Path
    view: bytes


def make_base(layout: Layout, directory: Path) -> Base:
    size, c, span = layout.size, layout.cluster, layout.l2_span
    image = directory / "base.qcow2"
    options = f"cluster_size={c}" + (",extended_l2=on" if layout.extended else "")
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options]
    if layout.backing:
        backing = directory / "back.raw"
        with backing.open("wb") as file:  # shorter than the guest: its tail reads as zeros
            file.write(bytes([FILLS[3]]) * (size * 3 // 4))
        create += ["-b", "back.raw", "-F", "raw"]
    qemu(*create, str(image), str(size))
    writes = [f"write -P {FILLS[0]:#x} 0 {3 * c}", f"write -z {5 * c} {c}"]
    writes.append(f"write -P {FILLS[1]:#x} {7 * c + c // 2} {c}")
    if span + 2 * c < size:  # a second (and third) L2 table
        writes.append(f"write -P {FILLS[2]:#x} {span + c} {c // 2}")
        writes.append(f"write -P {FILLS[1]:#x} {min(2 * span, size - c)} {c}")
    writes.append(f"write -P {FILLS[2]:#x} {size - c} {c}")
    qemu("qemu-io", "-f", "qcow2", *[arg for w in writes for arg in ("-c", w)], str(image))
    raw = directory / "view.raw"
    qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    return Base(layout, directory, image, raw.read_bytes())


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda layout: layout.name)
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Base:
    layout: Layout = request.param
    return make_base(layout, tmp_path_factory.mktemp(layout.name))


# Patches


@dataclass(frozen=True)
class Patch:
    region: str  # l1, l2, reftable, refblock
    live: bool  # a word qemu-img made non-zero (else any word of the region)
    index: int  # which word (modulo how many there are)
    mode: str  # word, offset, flags, refcount, copy
    value: int


def regions(q: Qcow2File) -> dict[str, list[int]]:
    """File offsets of the 8-byte words of each kind of table, as qemu-img left them."""
    c = q.cluster_size
    l1 = [q.l1_offset + 8 * i for i in range(q.l1_size)]
    l2 = [table + at for table in l2_tables(q) for at in range(0, c, 8)]
    reftable = [q.refcount_table_offset + 8 * i for i in range(min(64, c // 8))]
    blocks = sorted({q.u64(e) & ~0x1FF for e in reftable} - {0})
    refblock = [block + at for block in blocks for at in range(0, c, 8)]
    return {"l1": l1, "l2": l2, "reftable": reftable, "refblock": refblock}


def l2_tables(q: Qcow2File) -> list[int]:
    return sorted({q.u64(q.l1_offset + 8 * i) & OFFSET_MASK for i in range(q.l1_size)} - {0})


def guest_offsets(q: Qcow2File, extended: bool) -> dict[int, int]:
    """The guest offset each L1 and L2 word maps (file offset of the word -> guest offset)."""
    c = q.cluster_size
    entry = 16 if extended else 8
    span = c // entry * c
    mapped = {}
    for index in range(q.l1_size):
        mapped[q.l1_offset + 8 * index] = index * span
        table = q.u64(q.l1_offset + 8 * index) & OFFSET_MASK
        if table:
            for at in range(0, c, 8):
                mapped[table + at] = index * span + at // entry * c
    return mapped


def metadata_offsets(q: Qcow2File) -> list[int]:
    """Where qemu-img put the header and the tables: the values an attack names."""
    blocks = {q.u64(q.refcount_table_offset) & ~0x1FF}
    tables = sorted({q.l1_offset, q.refcount_table_offset, *blocks, *l2_tables(q)})
    return [*tables, 0]  # the header last: hypothesis favours the first (0|COPIED reads zeros)


def patches(clusters: int, cluster_size: int, metadata: list[int]) -> st.SearchStrategy[Patch]:
    """Words that name metadata, clusters of the file, near or past its end, unaligned,
    with flags or reserved bits, or anything at all."""
    flags = st.sampled_from([COPIED, 0, COMPRESSED, COPIED | ZERO_FLAG, ZERO_FLAG, RESERVED_L2])
    host = st.builds(
        lambda cluster, skew, flag: (cluster * cluster_size + skew) | flag,
        st.integers(0, clusters + 4),
        st.sampled_from([0, 0, 0, 8, 512, cluster_size // 2]),
        flags,
    )
    meta = st.builds(lambda at, flag: at | flag, st.sampled_from(metadata), flags)
    odd = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 2**64 - 1]))
    value = st.one_of(meta, meta, host, odd)
    return st.builds(
        Patch,
        st.sampled_from(["l2", "l2", "refblock", "l1", "refblock", "reftable"]),
        st.booleans(),
        st.integers(0, 1 << 16),
        st.sampled_from(["word", "word", "offset", "flags", "refcount", "copy"]),
        value,
    )


def apply(q: Qcow2File, words: list[int], patch: Patch) -> int:
    """Patch one word; returns its file offset."""
    at = words[patch.index % len(words)]
    old = q.u64(at)
    if patch.mode == "copy":  # another word of the region (two entries, one target)
        new = q.u64(words[(patch.index + 1 + patch.value % 7) % len(words)])
        new ^= COPIED if patch.value & 8 else 0
    elif patch.mode == "word":
        new = patch.value
    elif patch.mode == "offset":
        new = (old & ~OFFSET_MASK) | (patch.value & OFFSET_MASK)
    elif patch.mode == "flags":
        new = old ^ (patch.value & (COPIED | COMPRESSED | ZERO_FLAG | RESERVED_L2))
    else:  # one 16-bit field (a refcount in a block, part of an entry elsewhere)
        shift = 16 * (patch.index % 4)
        new = (old & ~(0xFFFF << shift)) | ((patch.value & 0xFFFF) << shift)
    q.set_u64(at, new & (2**64 - 1))
    return at


# Known bugs (see the tests at the end, all fixed): True steers the fuzzer around them.
AVOID_KNOWN_BUGS = False


def known_bug(q: Qcow2File, l2_words: list[int]) -> bool:
    """An L1 entry naming the table another L1 entry names, or an L1 or L2 entry naming a
    cluster past the end of the file (the allocator adopts it once the file grows)."""
    end = -(-q.path.stat().st_size // q.cluster_size) * q.cluster_size
    tables = [q.u64(q.l1_offset + 8 * i) & OFFSET_MASK for i in range(q.l1_size)]
    named = [t for t in tables if t]
    data = [w & OFFSET_MASK for w in map(q.u64, l2_words) if not w & COMPRESSED]
    return any(t >= end for t in named + data) or len(set(named)) != len(named)


# Guest requests


@dataclass(frozen=True)
class Op:
    kind: str  # read, read_range, write, zeroes, trim, flush
    offset: int
    length: int
    fill: int = 0
    may_trim: bool = False
    fast: bool = False


def ops(layout: Layout) -> st.SearchStrategy[Op]:
    size, c = layout.size, layout.cluster
    hot = [0, c, 3 * c, 5 * c, 7 * c, layout.l2_span, size - c, size - 2 * c]
    start = st.one_of(
        st.integers(0, 2).map(lambda patch: -1 - patch),  # where patch N maps (see resolve)
        st.sampled_from([h for h in hot if h < size]),
        st.integers(0, size // 512 - 1).map(lambda sector: sector * 512),
        st.integers(0, size - 1),
    )
    length = st.one_of(
        st.sampled_from([512, c, 2 * c, c + 512]),
        st.integers(1, 3 * c),
    )
    return st.builds(
        lambda kind, offset, count, fill, may_trim, fast: Op(
            kind, offset, max(1, min(count, 256 << 10)), fill, may_trim, fast
        ),
        st.sampled_from(["read", "read_range", "write", "write", "zeroes", "trim", "flush"]),
        start,
        length,
        st.sampled_from(FILLS),
        st.booleans(),
        st.booleans(),
    )


class Harness:
    """One patched image open in nbdguard, and what each request may change."""

    def __init__(self, path: Path, device: Qcow2Image, model: bytearray | None) -> None:
        self.path = path
        self.device = device
        self.model = model  # the exact guest view (only while no patch was applied)
        self.cluster = device.cluster_size
        self.header = self.fixed_header(path.read_bytes())
        self.errors = 0
        self.snapshot: tuple[bytes, set[int]] = (b"", set())  # file and metadata, as of now

    def fixed_header(self, data: bytes) -> bytes:
        """Cluster 0 with what the engine may change masked out."""
        head = bytearray(data[: self.cluster])
        head[REFTABLE_FIELDS] = bytes(12)
        flags = int.from_bytes(head[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8], "big")
        head[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8] = (flags & ~CORRUPT_BIT).to_bytes(8, "big")
        return bytes(head)

    def metadata_clusters(self, data_size: int) -> set[int]:
        meta = self.device.metadata
        return {c for c in range(-(-data_size // self.cluster) + 1) if meta.is_metadata(c)}

    def run(self, op: Op) -> None:
        before = self.path.read_bytes()
        meta_before = self.metadata_clusters(len(before))
        self.snapshot = (before, meta_before)
        written_back = self.device.refcounts.written_back if self.device.refcounts else 0
        start = time.process_time()
        try:
            self.request(op)
        except OSError as err:
            self.errors += 1
            allowed = ALLOWED_ERRNOS | ({errno.ENOTSUP} if op.kind == "zeroes" else set())
            assert err.errno in allowed, f"{op}: unexpected {err!r}"
        spent = time.process_time() - start
        assert spent < CPU_BOUND, f"{op} took {spent:.2f} s of CPU (bound {CPU_BOUND} s)"
        after = self.path.read_bytes()
        assert self.fixed_header(after) == self.header, f"{op} changed the header"
        if before == after:
            return
        changed = _changed_clusters(before, after, self.cluster)
        if op.kind == "flush":
            meta_after = self.metadata_clusters(len(after))
            stray = changed - meta_before - meta_after
            assert not stray, f"flush wrote non-metadata clusters {sorted(stray)}"
            return
        grown = self.device.refcounts is not None and (
            self.device.refcounts.written_back != written_back
        )
        touched = {c for c in changed & meta_before if c != 0}  # cluster 0: checked above
        if grown:  # refcount blocks written back past the cache budget are the engine's own
            kind_of = self.device.metadata.kind_of
            touched = {c for c in touched if kind_of(c) is not Kind.REFCOUNT_BLOCK}
        assert not touched, f"{op} changed metadata clusters {sorted(touched)}"

    def request(self, op: Op) -> None:
        device = self.device
        if op.kind == "read":
            self.check_read(op, bytes(device.pread(op.offset, op.length)))
        elif op.kind == "read_range":
            found = device.read_range(op.offset, op.length)
            if found is None:
                data = bytes(device.pread(op.offset, op.length))
            else:
                again = found.recheck() if found.recheck else None
                data = (
                    bytes(again)
                    if again is not None
                    else os.pread(found.fd, found.length, found.offset)
                )
            self.check_read(op, data)
        elif op.kind == "write":
            device.pwrite(bytes([op.fill]) * op.length, op.offset)
            self.model_set(op.offset, bytes([op.fill]) * op.length)
        elif op.kind == "zeroes":
            device.write_zeroes(op.offset, op.length, may_trim=op.may_trim, fast=op.fast)
            self.model_set(op.offset, bytes(op.length))
        elif op.kind == "trim":
            device.trim(op.offset, op.length)
            first, stop = device._whole_clusters(op.offset, op.length)
            end = min(stop * self.cluster, device.size)
            if first * self.cluster < end:
                self.model_set(first * self.cluster, bytes(end - first * self.cluster))
        else:
            device.flush()

    def model_set(self, offset: int, data: bytes) -> None:
        if self.model is not None:
            self.model[offset : offset + len(data)] = data

    def check_read(self, op: Op, data: bytes) -> None:
        """No piece of the reply (one guest cluster's share) holding bytes no guest wrote
        is the same bytes, at the same place, as a cluster the metadata map lists. (A
        table a patch orphaned is a leaked data cluster: its stale bytes may be read.)"""
        assert len(data) == op.length
        if not data.translate(None, GUEST_BYTES):
            return
        file, clusters = self.snapshot
        c = self.cluster
        position = op.offset
        while position < op.offset + op.length:
            within = position % c
            piece = data[position - op.offset : position - op.offset + c - within]
            if piece.translate(None, GUEST_BYTES):
                for cluster in clusters:
                    at = cluster * c + within
                    assert file[at : at + len(piece)] != piece, (
                        f"{op}: guest bytes at {position:#x} are those of metadata cluster "
                        f"{cluster} ({self.device.metadata.kind_of(cluster)})"
                    )
            position += len(piece)
        if self.model is not None:
            expected = bytes(self.model[op.offset : op.offset + op.length])
            assert data == expected, f"{op}: read differs from the model"


def _changed_clusters(before: bytes, after: bytes, cluster: int) -> set[int]:
    """Clusters whose bytes differ; past the old end of the file, zeros are no change
    (a cluster the engine allocated in memory reads as a hole until it is written)."""
    size = max(len(before), len(after))
    before, after = before.ljust(size, b"\0"), after.ljust(size, b"\0")
    changed = set()
    for index in range(-(-max(len(before), len(after)) // cluster)):
        window = slice(index * cluster, (index + 1) * cluster)
        if before[window] != after[window]:
            changed.add(index)
    return changed


def resolve(op: Op, targets: list[int], size: int) -> Op:
    """A negative offset -1-N means: the guest offset patch N maps (0 if none); the length
    is clipped to the disk."""
    offset = op.offset
    if offset < 0:
        offset = targets[-1 - offset] % size if -1 - offset < len(targets) else 0
    return dataclasses.replace(op, offset=offset, length=min(op.length, size - offset))


def _check_no_new_damage(patched: Path, path: Path) -> None:
    """qemu-img check finds no more corruption than was planted. The corrupt bit, when
    nbdguard set it, is set in the planted copy too: qemu-img counts the header word as an
    L2 entry when a patch points a table at cluster 0."""
    flags = Qcow2File(path).u64(INCOMPATIBLE_AT)
    if flags & CORRUPT_BIT:
        planted = Qcow2File(patched)
        planted.set_u64(INCOMPATIBLE_AT, planted.u64(INCOMPATIBLE_AT) | CORRUPT_BIT)
    before, after = corruptions(patched), corruptions(path)
    assert after <= before, f"qemu-img check: {before} corruptions planted, {after} after"


@dataclass
class Outcome:
    opened: int = 0
    refused: int = 0
    errors: int = 0
    corrupt: int = 0
    checked: int = 0

    def __str__(self) -> str:
        return (
            f"opened {self.opened}, refused at open {self.refused}, failed requests "
            f"{self.errors}, marked corrupt {self.corrupt}, qemu-img checked {self.checked}"
        )


def run_example(base: Base, work: Path, patch_list: list[Patch], steps: list[Op], check: bool,
                outcome: Outcome) -> None:  # fmt: skip
    path = work / "fuzz.qcow2"
    shutil.copyfile(base.image, path)
    q = Qcow2File(path)
    where = regions(q)  # of the pristine image: a patched table names no new words
    live = {name: [at for at in words if q.u64(at)] or words for name, words in where.items()}
    mapped = guest_offsets(q, base.layout.extended)
    targets = [
        mapped.get(apply(q, (live if patch.live else where)[patch.region], patch), 0)
        for patch in patch_list
    ]
    if AVOID_KNOWN_BUGS:
        stride = 2 if base.layout.extended else 1  # extended: every other word is a bitmap
        assume(not known_bug(q, where["l2"][::stride]))
    patched = work / "patched.qcow2"
    if check:
        shutil.copyfile(path, patched)
    config = ExportConfig(name="fuzz", path=path, format="qcow2")
    try:
        device = build_device(config)
    except ExportOpenError:
        outcome.refused += 1
        return
    assert isinstance(device, Qcow2Image)
    outcome.opened += 1
    model = bytearray(base.view) if not patch_list else None
    harness = Harness(path, device, model)
    try:
        # Each patched entry is read first and last, the random requests in between.
        probes = [Op("read", -1 - index, device.cluster_size) for index in range(len(targets))]
        for step in [*probes, *steps, *probes]:
            harness.run(resolve(step, targets, device.size))
    finally:
        try:
            device.close()
        except OSError as err:
            assert err.errno in ALLOWED_ERRNOS, f"close: unexpected {err!r}"
    outcome.errors += harness.errors
    outcome.corrupt += device.corrupt is not None
    assert harness.fixed_header(path.read_bytes()) == harness.header, "close changed the header"
    if check:
        outcome.checked += 1
        _check_no_new_damage(patched, path)
    if model is not None and check:
        raw = work / "fuzz.raw"
        qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
        assert raw.read_bytes() == bytes(model), "the image differs from the model after close"


def test_metadata_fuzz(base: Base, runslow: bool) -> None:
    layout = base.layout
    clusters = len(base.image.read_bytes()) // layout.cluster
    metadata = metadata_offsets(Qcow2File(base.image))
    patch = patches(clusters, layout.cluster, metadata)
    outcome = Outcome()

    @settings(
        max_examples=SLOW_EXAMPLES if runslow else CI_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        # A third of the examples are pristine: their reads are checked against a model.
        patch_list=st.one_of(st.just([]), *[st.lists(patch, min_size=1, max_size=3)] * 2),
        steps=st.lists(ops(layout), min_size=1, max_size=12),
    )
    def fuzz(patch_list: list[Patch], steps: list[Op]) -> None:
        # A fixed sample of the examples (by content: a shrunk example keeps its fate only
        # if it is the same example) gets qemu-img check.
        check = zlib.crc32(repr((patch_list, steps)).encode()) % CHECK_EVERY == 0
        run_example(base, base.directory, patch_list, steps, check, outcome)

    if not runslow:  # CI: the same examples every run, different ones per layout
        fuzz = seed(zlib.crc32(layout.name.encode()))(fuzz)
    fuzz()
    print(f"\n{layout.name}: {outcome}")
    assert outcome.opened > 0


# Bugs the fuzzer found, as minimal deterministic tests (fixed: they must stay fixed)


def _fresh(path: Path) -> Qcow2File:
    """4 KiB clusters, 8 MiB: one L2 table (L1 entry 0), one data cluster at guest 0."""
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), "8M")
    qemu("qemu-io", "-f", "qcow2", "-c", f"write -P {FILLS[0]:#x} 0 4k", str(path))
    return Qcow2File(path)


def test_entry_past_end_of_file_is_not_adopted_by_allocation(tmp_path: Path) -> None:
    """An L1 entry naming the first cluster past the end of the file: the allocator must
    not put a new L2 table there (two guest ranges would share it)."""
    path = tmp_path / "a.qcow2"
    q = _fresh(path)
    end = -(-path.stat().st_size // q.cluster_size) * q.cluster_size
    q.set_u64(q.l1_entry_at(4 << 20), end)  # L1 entry 2: past the end of the file
    planted = corruptions(path)
    device = build_device(ExportConfig(name="t", path=path, format="qcow2"))
    try:
        device.pwrite(bytes([FILLS[1]]) * 4096, 2 << 20)  # L1 entry 1: a new L2 table
        try:
            aliased = bytes(device.pread(4 << 20, 4096))
        except OSError as err:  # refusing the planted entry is fine
            assert err.errno == errno.EIO
        else:  # guest 4M reads zeros (or fails), never the bytes written at 2M
            assert aliased == bytes(4096), "guest 4 MiB reads what was written at 2 MiB"
    finally:
        device.close()
    assert corruptions(path) <= planted


def test_write_through_a_duplicate_l1_entry_then_flush(tmp_path: Path) -> None:
    """Two L1 entries name one L2 table (the second without COPIED): the second is refused
    as corrupt, FLUSH raises nothing but OSError and the acknowledged write is kept."""
    path = tmp_path / "a.qcow2"
    q = _fresh(path)
    table = q.u64(q.l1_entry_at(0)) & OFFSET_MASK
    q.set_u64(q.l1_entry_at(2 << 20), table)  # L1 entry 1 shares entry 0's table
    device = build_device(ExportConfig(name="t", path=path, format="qcow2"))
    try:
        device.pwrite(bytes([FILLS[1]]) * 4096, 4096)  # a new data cluster: table dirty
        try:
            device.pwrite(bytes([FILLS[2]]) * 4096, (2 << 20) + 8192)
        except OSError as err:  # refusing the shared table as corrupt is fine
            assert err.errno == errno.EIO
        device.flush()  # must not raise anything but OSError
    finally:
        with contextlib.suppress(OSError):
            device.close()
    assert bytes(device_view(path, 4096)) == bytes([FILLS[1]]) * 4096  # acknowledged: kept


def device_view(path: Path, offset: int, length: int = 4096) -> bytes:
    raw = path.with_suffix(".raw")
    qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    return raw.read_bytes()[offset : offset + length]


def test_l2_entry_past_end_of_file_is_not_adopted_by_allocation(tmp_path: Path) -> None:
    """An L2 entry naming the first cluster past the end of the file: the next data cluster
    must not land there (two guest offsets would share data)."""
    path = tmp_path / "a.qcow2"
    q = _fresh(path)
    end = -(-path.stat().st_size // q.cluster_size) * q.cluster_size
    q.set_u64(q.l2_entry_at(8192), end | COPIED)  # guest cluster 2: past the end of the file
    planted = corruptions(path)
    device = build_device(ExportConfig(name="t", path=path, format="qcow2"))
    try:
        device.pwrite(bytes([FILLS[1]]) * 4096, 4096)  # guest cluster 1: a new data cluster
        try:
            aliased = bytes(device.pread(8192, 4096))
        except OSError as err:
            assert err.errno == errno.EIO
        else:
            assert aliased != bytes([FILLS[1]]) * 4096, (
                "guest 8 KiB reads what was written at 4 KiB"
            )
    finally:
        device.close()
    assert corruptions(path) <= planted


def test_l2_entry_past_end_stays_refused_after_write_back_and_eviction(tmp_path: Path) -> None:
    """A table the engine changed and wrote back, then evicted, reloads with its planted
    entry still refused (the file's word, unchanged), and the entry is written back as the
    file had it."""
    path = tmp_path / "a.qcow2"
    q = _fresh(path)
    end = -(-path.stat().st_size // q.cluster_size) * q.cluster_size
    at = q.l2_entry_at(8192)
    q.set_u64(at, end | COPIED)  # guest cluster 2: past the end of the file
    device = build_device(ExportConfig(name="t", path=path, format="qcow2"))
    assert isinstance(device, Qcow2Image)
    try:
        device.pwrite(bytes([FILLS[1]]) * 4096, 4096)  # dirties the table
        device.flush()
        device.l2_cache.evict(device.l2_cache.limit)  # drops every clean table
        assert len(device.l2_cache) == 0
        with pytest.raises(OSError) as raised:
            device.pread(8192, 4096)
        assert raised.value.errno == errno.EIO
        assert bytes(device.pread(4096, 4096)) == bytes([FILLS[1]]) * 4096
    finally:
        device.close()
    assert Qcow2File(path).u64(at) == end | COPIED  # the planted word, as it was
