"""The full open-time check (`check_on_open = "full"`): every reference against the refcounts.

What `qemu-img check` does, read-only: walk the header cluster, the active L1 table and its
L2 tables, the data clusters and compressed spans they name, the refcount table and blocks,
the snapshot table with each snapshot's L1 and L2 tables, and the bitmap directory with its
bitmap tables and their clusters; count the references each host cluster should have (a
compact array of u32, one per cluster of the file) and compare with the stored refcounts.

Findings, by kind (`REFUSING` kinds refuse the image at open with `reason=corrupt`):
- `leak`: a refcount above the references (harmless: space never reused; reported only);
- `refcount_low`: a refcount below the references (a cluster the allocator could hand out
  again while in use, e.g. a data cluster that is also an L2 table, or a refcount of 0);
- `overlap`: a metadata cluster also referenced as data or as other metadata;
- `past_eof`: a reference to a cluster at or past the end of the file (QEMU's rule: a span
  may end inside the last, partial cluster);
- `invalid_entry`: an unaligned table or cluster, reserved bits set, a table over QEMU's size
  limits;
- `copied_wrong`: the COPIED flag on an entry whose cluster's refcount is not 1 (an in-place
  write would change what a snapshot holds);
- `copied_missing`: no COPIED flag on a refcount-1 cluster (harmless: it is copied on write);
- `too_large`: more clusters than a check may hold counts for (MAX_CHECK_CLUSTERS).

`leaks` and `corruptions` are counted the way `qemu-img check` counts them (an overlap shows
there as the refcount_low of its cluster; reserved bits and too_large are ours alone).

Work is proportional to the metadata, not to the data: each distinct L2 table is read once
(a table named by several L1 entries adds its references that many times), each refcount
block once, and the walk stops after STOP_AFTER_ERRORS refusing findings. Measured on the
shared 2-core test machine (load ~5) with images fully allocated by `qemu-img create -o
preallocation=metadata`, per GiB of referenced data: 64 KiB clusters 0.01 s (16384 L2
entries), 4 KiB clusters 0.13-0.22 s (262144), 512 B clusters 1.9 s (2 Mi); i.e. about
0.9 µs per L2 entry, so the worst an image can ask is about 2 minutes per GiB of its own file
made into L2 tables. Memory: two u32 per cluster of the file (MAX_CHECK_CLUSTERS bounds it).
It runs where the export is opened (startup, SIGHUP reload, check-config), never per
request; `progress` is called about once a second of work.
"""

from __future__ import annotations

import contextlib
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from nbdguard.storage.qcow2.compressed import compressed_extent, host_clusters
from nbdguard.storage.qcow2.header import (
    MAX_L1_BYTES,
    Qcow2Header,
)
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.qcow2.image import (
    COMPRESSED,
    COPIED,
    DESCRIPTOR_MASK,
    L2_RESERVED,
    OFFSET_MASK,
)
from nbdguard.storage.qcow2.metadata import (
    L1_RESERVED,
    REFTABLE_RESERVED,
    BitmapInvalid,
    BitmapTable,
    Kind,
    bitmap_data,
    bitmap_directory,
    bitmap_tables,
    check_bitmap_table,
    snapshot_entries,
)
from nbdguard.storage.qcow2.refcounts import load_table

REFUSING = frozenset(
    {"refcount_low", "overlap", "past_eof", "invalid_entry", "copied_wrong", "too_large"}
)
QEMU_CORRUPTIONS = frozenset(
    {"refcount_low", "past_eof", "invalid_entry", "copied_wrong", "copied_missing"}
)
MAX_CHECK_CLUSTERS = 1 << 25  # 32 Mi clusters: two u32 arrays of 128 MiB each at most
KEPT_FINDINGS = 50  # of each severity; beyond, only counted
STOP_AFTER_ERRORS = 1000  # refusing findings after which the walk stops: refused anyway
PROGRESS_SECONDS = 1.0
COMPARE_CHUNK = 1 << 16
SATURATED = (1 << 32) - 1
_BIG_ENDIAN = sys.byteorder == "big"
_SHARED_L2 = frozenset({Kind.L2.label, Kind.SNAPSHOT_L2.label})

Progress = Callable[[dict[str, object]], None]


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    detail: str
    host_offset: int | None = None

    @property
    def refuses(self) -> bool:
        return self.kind in REFUSING

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(slots=True)
class CheckReport:
    clusters: int = 0  # clusters of the file
    data_bytes: int = 0  # bytes of data clusters and compressed spans referenced
    l2_tables: int = 0  # distinct L2 tables read
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    errors_kept: list[Finding] = field(default_factory=list)  # the first refusing ones
    notes_kept: list[Finding] = field(default_factory=list)  # the first harmless ones
    stopped: bool = False  # STOP_AFTER_ERRORS reached: the counts are a lower bound

    def add(self, kind: str, detail: str, host_offset: int | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        refusing = kind in REFUSING
        kept = self.errors_kept if refusing else self.notes_kept
        if len(kept) < KEPT_FINDINGS:
            kept.append(Finding(kind, detail, host_offset))
        if refusing and self.errors >= STOP_AFTER_ERRORS:
            self.stopped = True
            raise _Enough

    @property
    def leaks(self) -> int:
        return self.counts.get("leak", 0)

    @property
    def corruptions(self) -> int:
        """As `qemu-img check` counts them."""
        return sum(self.counts.get(kind, 0) for kind in QEMU_CORRUPTIONS)

    @property
    def errors(self) -> int:
        """Findings that refuse the image."""
        return sum(self.counts.get(kind, 0) for kind in REFUSING)

    @property
    def clean(self) -> bool:
        return not self.counts

    def summary(self, first: int = 3) -> str:
        if self.clean:
            return "no findings"
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(self.counts.items()))
        shown = (self.errors_kept or self.notes_kept)[:first]
        return f"{counts}; first: " + "; ".join(str(finding) for finding in shown)

    def as_dict(self) -> dict[str, object]:
        return {
            "leaks": self.leaks,
            "corruptions": self.corruptions,
            "errors": self.errors,
            "counts": dict(sorted(self.counts.items())),
            "findings": [str(finding) for finding in self.errors_kept + self.notes_kept],
            "clusters": self.clusters,
            "data_bytes": self.data_bytes,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
        }


class _Enough(Exception):
    """Enough errors to refuse the image: a hostile one cannot make the walk long."""


def check_image(
    header: Qcow2Header, host: HostFile, *, progress: Progress | None = None
) -> CheckReport:
    """Check a qcow2 layer (read-only: nothing is written). The report says what was found."""
    checker = _Checker(header, host, progress)
    started = time.monotonic()
    with contextlib.suppress(_Enough):
        checker.run()
    checker.report.seconds = time.monotonic() - started
    return checker.report


def _u32_from(values: bytes | bytearray, width: int) -> array[int]:
    """Big-endian unsigned entries of `width` bytes (1, 2, 4 or 8) as u32s, saturated."""
    if width == 1:
        return array("I", iter(values))
    code = {2: "H", 4: "I", 8: "Q"}[width]
    table = array(code, bytes(values))
    if not _BIG_ENDIAN:
        table.byteswap()
    if width == 8:
        return array("I", (min(value, SATURATED) for value in table))
    return table if width == 4 else array("I", table)


def decode_refcounts(block: bytes | bytearray, bits: int) -> array[int]:
    """Every refcount of a refcount block, in order, as u32s (wider ones saturated)."""
    if bits >= 8:
        return _u32_from(block, bits // 8)
    mask = (1 << bits) - 1
    per_byte = 8 // bits
    out = bytearray(len(block) * per_byte)
    for position in range(per_byte):
        shift = position * bits
        table = bytes((value >> shift) & mask for value in range(256))
        out[position::per_byte] = block.translate(table)
    return array("I", iter(out))


class _Checker:
    def __init__(self, header: Qcow2Header, host: HostFile, progress: Progress | None) -> None:
        self.header = header
        self.host = host
        self.bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.file_size = host.size
        self.clusters = -(-self.file_size >> self.bits)
        self.report = CheckReport(clusters=self.clusters)
        self.data_file = header.has_data_file
        self.words = 2 if header.extended_l2 else 1
        self.expected = array("I")
        self.stored = array("I")
        self.roles: dict[int, str] = {}  # metadata cluster -> its label (Kind.label, bitmap_*)
        self.l2_refs: dict[int, int] = {}  # L2 table offset -> references to it
        self.active_l2: set[int] = set()
        self._progress = progress
        self._last_progress = time.monotonic()

    def run(self) -> None:
        if self.clusters > MAX_CHECK_CLUSTERS:
            self.report.add(
                "too_large",
                f"{self.clusters} clusters: more than a full check holds counts for "
                f'({MAX_CHECK_CLUSTERS}); serve it with check_on_open = "light"',
            )
            return
        self.expected = array("I", bytes(4 * self.clusters))
        self.stored = array("I", bytes(4 * self.clusters))
        self.count_range(0, self.cluster_size, Kind.HEADER.label, "header")
        self.refcounts()
        self.active_l1()
        self.snapshots()
        self.bitmaps()
        self.walk_l2()
        self.compare()

    # -- bookkeeping

    def tick(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self._progress is not None and now - self._last_progress >= PROGRESS_SECONDS:
            self._last_progress = now
            self._progress({"phase": phase, "done": done, "total": total})

    def inside(self, offset: int, length: int, what: str) -> bool:
        """QEMU's rule: a span may end inside the last, partial cluster, no further."""
        if offset + length - self.file_size >= self.cluster_size:
            self.report.add(
                "past_eof", f"{what} ({length} bytes at {offset:#x}) is past the end", offset
            )
            return False
        return True

    def bump(self, cluster: int, times: int) -> None:
        try:
            self.expected[cluster] += times
        except OverflowError:
            self.expected[cluster] = SATURATED

    def mark(self, cluster: int, role: str, what: str) -> None:
        old = self.roles.setdefault(cluster, role)
        if old != role and {old, role} != _SHARED_L2:
            offset = cluster << self.bits
            self.report.add("overlap", f"{what} at {offset:#x} is also {old}", offset)

    def count_range(self, offset: int, length: int, role: str, what: str, times: int = 1) -> bool:
        """References from a metadata table to the clusters of a byte range."""
        if length <= 0:
            return True
        if not self.inside(offset, length, what):
            return False
        for cluster in range(offset >> self.bits, ((offset + length - 1) >> self.bits) + 1):
            self.mark(cluster, role, what)
            self.bump(cluster, times)
        return True

    def stored_of(self, offset: int) -> int:
        cluster = offset >> self.bits
        return self.stored[cluster] if cluster < self.clusters else 0

    def copied(self, entry: int, offset: int, what: str) -> None:
        """QEMU's OFLAG_COPIED check, on the active tables."""
        refcount = self.stored_of(offset)
        if entry & COPIED and refcount != 1:
            self.report.add(
                "copied_wrong",
                f"{what} {offset:#x} is COPIED but its refcount is {refcount}",
                offset,
            )
        elif not entry & COPIED and refcount == 1:
            self.report.add(
                "copied_missing", f"{what} {offset:#x} lacks COPIED (refcount 1)", offset
            )

    # -- the tables

    def refcounts(self) -> None:
        header = self.header
        length = header.refcount_table_clusters * self.cluster_size
        self.count_range(
            header.refcount_table_offset, length, Kind.REFCOUNT_TABLE.label, "refcount table"
        )
        table = load_table(self.host, header.refcount_table_offset, length)
        per_block = self.cluster_size * 8 >> header.refcount_order
        for index, entry in enumerate(table):
            offset = entry & ~REFTABLE_RESERVED
            if not offset:
                continue
            what = f"refcount block {index}"
            if entry & REFTABLE_RESERVED or offset % self.cluster_size:
                self.report.add(
                    "invalid_entry", f"{what}: table entry {entry:#x} is invalid", offset
                )
                continue
            if not self.count_range(offset, self.cluster_size, Kind.REFCOUNT_BLOCK.label, what):
                continue
            first = index * per_block
            if first >= self.clusters:
                continue
            values = decode_refcounts(
                self.host.read(offset, self.cluster_size), 1 << header.refcount_order
            )
            stop = min(self.clusters, first + per_block)
            self.stored[first:stop] = values[: stop - first]
            self.tick("refcounts", index, len(table))

    def l1_table(self, offset: int, size: int, *, active: bool, what: str, times: int) -> None:
        """References an L1 table holds to L2 tables (counted `times`: its references)."""
        table = load_table(self.host, offset, size * 8)
        for index, entry in enumerate(table):
            l2 = entry & OFFSET_MASK
            if not l2:
                continue
            name = f"{what} entry {index}: L2 table"
            if entry & L1_RESERVED or l2 % self.cluster_size:
                self.report.add("invalid_entry", f"{name} entry {entry:#x} is invalid", l2)
                continue
            if not self.inside(l2, self.cluster_size, name):
                continue
            self.l2_refs[l2] = self.l2_refs.get(l2, 0) + times
            role = Kind.L2.label if active else Kind.SNAPSHOT_L2.label
            self.mark(l2 >> self.bits, role, name)
            if active:
                self.active_l2.add(l2)
                self.copied(entry, l2, "L2 table")

    def active_l1(self) -> None:
        header = self.header
        self.count_range(header.l1_table_offset, header.l1_size * 8, Kind.L1.label, "L1 table")
        self.l1_table(header.l1_table_offset, header.l1_size, active=True, what="L1", times=1)

    def snapshots(self) -> None:
        header = self.header
        end = header.snapshots_offset
        tables: dict[tuple[int, int], int] = {}
        count = 0
        for snapshot in snapshot_entries(header, self.host.read):
            count += 1
            end = snapshot.end
            offset, size, what = (
                snapshot.l1_offset,
                snapshot.l1_size,
                f"snapshot {snapshot.number} L1",
            )
            if not size:
                continue
            if size * 8 > MAX_L1_BYTES or offset % self.cluster_size or not offset:
                self.report.add(
                    "invalid_entry", f"{what} table ({size} entries at {offset:#x})", offset
                )
                continue
            if self.count_range(offset, size * 8, Kind.SNAPSHOT_L1.label, f"{what} table"):
                tables[(offset, size)] = tables.get((offset, size), 0) + 1
        if count < header.nb_snapshots:
            self.report.add("invalid_entry", "snapshot table larger than 64 MiB")
        self.count_range(
            header.snapshots_offset,
            end - header.snapshots_offset,
            Kind.SNAPSHOT_TABLE.label,
            "snapshot table",
        )
        for number, ((offset, size), times) in enumerate(tables.items()):
            self.l1_table(offset, size, active=False, what="snapshot L1", times=times)
            self.tick("snapshots", number, len(tables))

    def bitmaps(self) -> None:
        """The bitmap directory and what it names; ignored, as QEMU does, once a program
        that does not know bitmaps has cleared the autoclear bit."""
        try:
            directory = bitmap_directory(self.header, self.host.read, self.file_size)
            if directory is None:
                return
            offset, size = directory.offset, directory.size
            if not self.count_range(offset, size, Kind.BITMAP_DIRECTORY.label, "bitmap directory"):
                return
            for table in bitmap_tables(directory, self.host.read(offset, size)):
                self.bitmap_table(table)
        except BitmapInvalid as err:
            self.report.add("invalid_entry", err.detail, err.offset)

    def bitmap_table(self, table: BitmapTable) -> None:
        what = f"bitmap {table.number} table"
        try:
            check_bitmap_table(table, self.cluster_size, what)
        except BitmapInvalid as err:
            self.report.add("invalid_entry", err.detail, err.offset)
            return
        offset, length = table.offset, table.size * 8
        if not self.count_range(offset, length, Kind.BITMAP_TABLE.label, what):
            return
        for index, entry in enumerate(load_table(self.host, offset, length)):
            try:
                data = bitmap_data(entry, self.cluster_size, f"{what} entry {index}")
            except BitmapInvalid as err:
                self.report.add("invalid_entry", err.detail, err.offset)
                continue
            if data:
                self.count_range(
                    data, self.cluster_size, Kind.BITMAP_DATA.label, f"{what} entry {index}"
                )

    # -- data references

    def walk_l2(self) -> None:
        self.report.l2_tables = len(self.l2_refs)
        for number, (offset, times) in enumerate(self.l2_refs.items()):
            self.bump(offset >> self.bits, times)
            self.l2_table(offset, times, active=offset in self.active_l2)
            self.tick("l2_tables", number, len(self.l2_refs))

    def l2_table(self, offset: int, times: int, *, active: bool) -> None:
        """Count one L2 table's references. The common entry (a standard, aligned data
        cluster inside the file, outside metadata, COPIED as its refcount says) is counted
        inline; anything else goes to `entry`, which says what is wrong."""
        table = load_table(self.host, offset, self.cluster_size)
        words, bits, clusters = self.words, self.bits, self.clusters
        expected, stored, roles = self.expected, self.stored, self.roles
        unusual = COMPRESSED | L2_RESERVED | (self.cluster_size - 1 & OFFSET_MASK)
        if self.data_file:
            unusual = ~0  # nothing of the data file is counted: every entry only checked
        plain = 0
        for slot in range(0, len(table), words):
            word = table[slot]
            if not word & ~COPIED:
                continue  # unallocated, or (with a data file) its cluster 0: not counted
            cluster = (word & OFFSET_MASK) >> bits
            if (
                word & unusual
                or not 0 < cluster < clusters
                or cluster in roles
                or (active and (word >> 63) != (stored[cluster] == 1))
            ):
                self.entry(word, times, f"L2 table {offset:#x} entry {slot // words}", active)
                continue
            try:
                expected[cluster] += times
            except OverflowError:
                expected[cluster] = SATURATED
            plain += 1
        self.report.data_bytes += plain << bits

    def entry(self, word: int, times: int, where: str, active: bool) -> None:
        if word & COMPRESSED:
            if word & COPIED:
                self.report.add("invalid_entry", f"{where}: compressed and COPIED")
            self.compressed(word, times, where)
            return
        host = word & OFFSET_MASK
        if word & L2_RESERVED:
            self.report.add("invalid_entry", f"{where} ({word:#x}) has reserved bits set", host)
        if not self.data_file and host:
            self.data(host, word, times, where, active=active)

    def data(self, host: int, word: int, times: int, where: str, *, active: bool) -> None:
        if active:
            self.copied(word, host, "data cluster")
        if not self.inside(host, self.cluster_size, f"{where}: data cluster"):
            return
        cluster = host >> self.bits
        if host % self.cluster_size:
            self.report.add("invalid_entry", f"{where}: data cluster {host:#x} is unaligned", host)
        role = self.roles.get(cluster)
        if role is not None:
            self.report.add("overlap", f"{where}: data cluster {host:#x} is {role}", host)
        self.bump(cluster, times)
        self.report.data_bytes += self.cluster_size

    def compressed(self, word: int, times: int, where: str) -> None:
        extent = compressed_extent(word & DESCRIPTOR_MASK, self.bits)
        if self.data_file:
            self.report.add("invalid_entry", f"{where}: compressed cluster with a data file")
            return
        if not self.inside(extent.offset, extent.length, f"{where}: compressed cluster"):
            return
        for cluster in host_clusters(extent, self.bits):
            role = self.roles.get(cluster)
            if role is not None:
                self.report.add(
                    "overlap",
                    f"{where}: compressed bytes at {extent.offset:#x} are in {role}",
                    extent.offset,
                )
            self.bump(cluster, times)
        self.report.data_bytes += extent.length

    # -- the comparison

    def compare(self) -> None:
        expected, stored = self.expected, self.stored
        for start in range(0, self.clusters, COMPARE_CHUNK):
            self.tick("compare", start, self.clusters)
            stop = min(self.clusters, start + COMPARE_CHUNK)
            if expected[start:stop] == stored[start:stop]:
                continue
            for cluster in range(start, stop):
                have, want = stored[cluster], expected[cluster]
                if have == want:
                    continue
                kind = "leak" if have > want else "refcount_low"
                role = self.roles.get(cluster)
                offset = cluster << self.bits
                what = f" ({role})" if role is not None else ""
                self.report.add(
                    kind,
                    f"cluster {cluster}{what} at {offset:#x}: refcount {have}, {want} references",
                    offset,
                )
