"""Which host clusters of a qcow2 image hold metadata (QEMU's overlap check, as a map).

Built once at open from the header (cluster 0, which also holds the header extensions area
and the backing file name), the active L1 table, the refcount table, the snapshot table and
the bitmap directory (its bitmap tables and their data clusters); kept current by the engine
when it allocates or frees an L2 table, a refcount block or a refcount table. Lookups are
O(1) (one dict probe), so every host offset taken from metadata can be checked against it
before use: a data cluster, a compressed extent or an allocation that lands on metadata is
corruption, never something to read or write.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from nbdguard.storage.qcow2.header import (
    BITMAPS_CONSISTENT,
    EXT_BITMAPS,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    Qcow2Header,
    header_extensions,
)

L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1_RESERVED = 0x7F00_0000_0000_01FF  # bits 0-8 and 56-62 of an L1 entry
REFTABLE_RESERVED = 0x1FF  # bits 0-8 of a refcount table entry
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
_SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes, then extra data, id, name
# QEMU's limits on persistent bitmaps (block/qcow2-bitmap.c)
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 64 << 20
MAX_BITMAP_TABLE_BYTES = 64 << 20
BITMAP_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
BITMAP_RESERVED = 0xFF00_0000_0000_01FE  # bits 1-8 and 56-63 of a bitmap table entry
_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # table offset, size, flags, type, gran., name, extra


class Kind(enum.IntEnum):
    HEADER = 1  # cluster 0: header, extensions, backing name
    L1 = 2
    L2 = 3
    REFCOUNT_TABLE = 4
    REFCOUNT_BLOCK = 5
    SNAPSHOT_TABLE = 6
    SNAPSHOT_L1 = 7
    SNAPSHOT_L2 = 8
    BITMAP_DIRECTORY = 9
    BITMAP_TABLE = 10
    BITMAP_DATA = 11

    @property
    def label(self) -> str:
        return self.name.lower()


# Kinds the engine never frees: snapshot metadata belongs to the snapshot, bitmaps to
# whoever maintains them (nbdguard does not), not to it.
HELD = frozenset(
    {
        Kind.HEADER,
        Kind.SNAPSHOT_TABLE,
        Kind.SNAPSHOT_L1,
        Kind.SNAPSHOT_L2,
        Kind.BITMAP_DIRECTORY,
        Kind.BITMAP_TABLE,
        Kind.BITMAP_DATA,
    }
)

Reader = Callable[[int, int], bytes]


class MetadataMap:
    """Cluster index -> what metadata it holds."""

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self._kinds: dict[int, Kind] = {}
        self.findings: list[str] = []  # impossible entries seen while building

    def __len__(self) -> int:
        return len(self._kinds)

    def is_metadata(self, cluster: int) -> bool:
        return cluster in self._kinds

    def kind_of(self, cluster: int) -> Kind | None:
        return self._kinds.get(cluster)

    def add(self, cluster: int, kind: Kind) -> Kind | None:
        """Mark a cluster; returns the kind it already had if that was a different one (the
        mark is then left as it was)."""
        old = self._kinds.setdefault(cluster, kind)
        return None if old == kind else old

    def add_range(self, offset: int, length: int, kind: Kind) -> Kind | None:
        """Mark every cluster of a byte range; the first conflicting kind, if any."""
        conflict: Kind | None = None
        for cluster in _clusters(offset, length, self.cluster_bits):
            old = self.add(cluster, kind)
            conflict = conflict or old
        return conflict

    def release(self, cluster: int) -> bool:
        """The engine freed a cluster (its refcount reached zero): forget it. False if it
        holds metadata the engine does not own (header, snapshot tables)."""
        kind = self._kinds.get(cluster)
        if kind in HELD:
            return False
        self._kinds.pop(cluster, None)
        return True


def _clusters(offset: int, length: int, cluster_bits: int) -> range:
    if length <= 0:
        return range(0)
    return range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1)


def build_map(
    header: Qcow2Header,
    read: Reader,
    file_size: int,
    l1: Iterable[int],
    refcount_table: Iterable[int],
) -> MetadataMap:
    """One pass over the tables the header names. Entries that cannot be metadata (unaligned,
    past the end of the file, reserved bits, already another kind) are not marked: the
    engine checks each entry's target against the map when it uses it."""
    bits = header.cluster_bits
    size = header.cluster_size
    meta = MetadataMap(bits)
    meta.add(0, Kind.HEADER)
    meta.add_range(header.l1_table_offset, header.l1_size * 8, Kind.L1)
    meta.add_range(
        header.refcount_table_offset, header.refcount_table_clusters * size, Kind.REFCOUNT_TABLE
    )
    for index, entry in enumerate(refcount_table):
        offset = entry & ~REFTABLE_RESERVED
        if not offset:
            continue
        if entry & REFTABLE_RESERVED or not _valid(offset, size, file_size):
            meta.findings.append(f"refcount table entry {index} ({entry:#x}) is invalid")
        elif meta.add(offset >> bits, Kind.REFCOUNT_BLOCK) is not None:
            meta.findings.append(f"refcount block {offset:#x} overlaps other metadata")
    _mark_snapshots(meta, header, read, file_size)
    _mark_l2(meta, l1, Kind.L2, size=size, file_size=file_size, what="L1")
    # Last: the metadata the engine uses keeps its kind in a conflict (a bitmap entry naming
    # an L2 table is the finding; the cluster stays marked, as an L2 table).
    _mark_bitmaps(meta, header, read, file_size)
    return meta


def _valid(offset: int, cluster_size: int, file_size: int) -> bool:
    return (
        offset % cluster_size == 0
        and 0 < offset <= MAX_HOST_OFFSET
        and offset + cluster_size <= -(-file_size // cluster_size) * cluster_size
    )


def _mark_l2(
    meta: MetadataMap, l1: Iterable[int], kind: Kind, *, size: int, file_size: int, what: str
) -> None:
    for index, entry in enumerate(l1):
        offset = entry & L1_OFFSET_MASK
        if not offset:
            continue
        if entry & L1_RESERVED or not _valid(offset, size, file_size):
            meta.findings.append(f"{what} entry {index} ({entry:#x}) is invalid")
            continue
        old = meta.add(offset >> meta.cluster_bits, kind)
        if old is not None and {old, kind} != {Kind.L2, Kind.SNAPSHOT_L2}:
            meta.findings.append(f"{what} entry {index}: L2 table {offset:#x} is {old.label}")


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One entry of the snapshot table, as far as the metadata map and the check need it."""

    number: int
    position: int  # host offset of the entry
    length: int  # bytes, before padding to 8
    l1_offset: int
    l1_size: int

    @property
    def end(self) -> int:
        """Where the next entry starts."""
        return self.position + ((self.length + 7) & ~7)


def snapshot_entries(header: Qcow2Header, read: Reader) -> Iterator[SnapshotEntry]:
    """The snapshot table's entries in order; stops early (fewer than nb_snapshots) once the
    table would pass MAX_SNAPSHOT_TABLE_BYTES."""
    position = header.snapshots_offset
    for number in range(header.nb_snapshots):
        if position - header.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES:
            return
        fixed = read(position, _SNAPSHOT_FIXED.size)
        (l1_offset, l1_size, id_size, name_size, _, _, _, _, extra) = _SNAPSHOT_FIXED.unpack(fixed)
        length = _SNAPSHOT_FIXED.size + extra + id_size + name_size
        entry = SnapshotEntry(number, position, length, l1_offset, l1_size)
        yield entry
        position = entry.end


def _mark_snapshots(meta: MetadataMap, header: Qcow2Header, read: Reader, file_size: int) -> None:
    """The snapshot table, each snapshot's L1 table and the L2 tables it names."""
    size = header.cluster_size
    seen: set[tuple[int, int]] = set()
    count = 0
    for snapshot in snapshot_entries(header, read):
        count += 1
        number, l1_offset, l1_size = snapshot.number, snapshot.l1_offset, snapshot.l1_size
        meta.add_range(snapshot.position, snapshot.length, Kind.SNAPSHOT_TABLE)
        if (l1_offset, l1_size) in seen:
            continue
        seen.add((l1_offset, l1_size))
        bad = l1_offset % size or l1_offset <= 0 or l1_offset + l1_size * 8 > file_size
        if l1_size * 8 > MAX_L1_BYTES or bad:
            meta.findings.append(f"snapshot {number}: L1 table {l1_offset:#x} is invalid")
            continue
        if meta.add_range(l1_offset, l1_size * 8, Kind.SNAPSHOT_L1) not in (None, Kind.SNAPSHOT_L1):
            meta.findings.append(f"snapshot {number}: L1 table overlaps other metadata")
            continue
        table = struct.unpack(f">{l1_size}Q", read(l1_offset, l1_size * 8))
        what = f"snapshot {number} L1"
        _mark_l2(meta, table, Kind.SNAPSHOT_L2, size=size, file_size=file_size, what=what)
    if count < header.nb_snapshots:
        meta.findings.append("snapshot table larger than 64 MiB")


# Persistent bitmaps. nbdguard does not maintain them: on a writable open the image engine
# clears the autoclear bit BITMAPS_CONSISTENT before its first write (the spec's rule for a
# writer that does not know a feature), so QEMU then ignores the bitmaps and reports their
# clusters as leaked, and its rule is to treat them as stale. Their clusters stay in the map
# all the same, for as long as the export is open:
# - the map is built from the header as it was at open, when the bitmaps were valid; a
#   read-only open clears nothing, and QEMU goes on trusting them;
# - their clusters are still referenced (the directory stays in the header, their refcounts
#   stay 1) until `qemu-img check -r leaks` or QEMU drops them. Data landing there, through
#   an L2 entry naming one or an allocation of one whose refcount a hostile image set to 0,
#   would alias two owners in one cluster, and a guest read would return bitmap bytes that
#   are not the guest's. QEMU's overlap check refuses both; so does the map.
# An image opened with the bit already clear has its bitmaps ignored, as QEMU does (and as
# the full check does): their clusters are then leaks, held by their refcounts alone.


class BitmapInvalid(Exception):
    """An impossible value in the bitmaps extension, directory or a bitmap table."""

    def __init__(self, detail: str, offset: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.offset = offset


@dataclass(frozen=True, slots=True)
class BitmapDirectory:
    """The bitmaps header extension: where the directory is and how many entries it has."""

    count: int
    offset: int
    size: int  # bytes


@dataclass(frozen=True, slots=True)
class BitmapTable:
    """One bitmap directory entry's table."""

    number: int
    offset: int
    size: int  # entries (u64 each)


def bitmap_directory(header: Qcow2Header, read: Reader, file_size: int) -> BitmapDirectory | None:
    """The bitmaps extension, when QEMU would use it (version 3, BITMAPS_CONSISTENT set);
    BitmapInvalid when it is truncated or over QEMU's limits or unaligned."""
    if header.version < 3 or not header.autoclear & BITMAPS_CONSISTENT:
        return None
    first = read(0, min(file_size, header.cluster_size))
    extension = header_extensions(first, header).get(EXT_BITMAPS)
    if extension is None:
        return None
    if len(extension) < _BITMAPS_EXT.size:
        raise BitmapInvalid("bitmaps extension is truncated")
    count, _, size, offset = _BITMAPS_EXT.unpack_from(extension)
    if count > MAX_BITMAPS or size > MAX_BITMAP_DIRECTORY or offset % header.cluster_size:
        raise BitmapInvalid(f"bitmap directory ({size} bytes at {offset:#x})", offset)
    return BitmapDirectory(count, offset, size)


def bitmap_tables(directory: BitmapDirectory, data: bytes) -> Iterator[BitmapTable]:
    """The directory's entries in order (`data`: the directory's bytes); BitmapInvalid once
    an entry runs past the directory."""
    position = 0
    for number in range(directory.count):
        if position + _BITMAP_ENTRY.size > directory.size:
            raise BitmapInvalid(f"bitmap {number} runs past the directory")
        offset, size, _, _, _, name_size, extra = _BITMAP_ENTRY.unpack_from(data, position)
        position += (_BITMAP_ENTRY.size + extra + name_size + 7) & ~7
        yield BitmapTable(number, offset, size)


def check_bitmap_table(table: BitmapTable, cluster_size: int, what: str) -> None:
    """QEMU's limits on a bitmap table's place and size."""
    size, offset = table.size, table.offset
    if size * 8 > MAX_BITMAP_TABLE_BYTES or offset % cluster_size or (size and not offset):
        raise BitmapInvalid(f"{what} ({size} entries at {offset:#x})", offset)


def bitmap_data(entry: int, cluster_size: int, what: str) -> int:
    """The data cluster a bitmap table entry names (0: none, the bits are all 0 or all 1)."""
    offset = entry & BITMAP_OFFSET_MASK
    if offset and (entry & BITMAP_RESERVED or offset % cluster_size):
        raise BitmapInvalid(f"{what} ({entry:#x})", offset)
    return offset


def decode_table(data: bytes) -> array[int]:
    """A big-endian u64 table as native ints."""
    table = array("Q", data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def _fresh_range(meta: MetadataMap, offset: int, length: int, file_size: int) -> bool:
    """A cluster-aligned range inside the file (rounded up to a cluster) that no metadata
    holds yet: a bitmap table may share its clusters with nothing, not even another one
    (which also bounds what the tables cost to read by the size of the file)."""
    size = 1 << meta.cluster_bits
    end = -(-file_size // size) * size
    if offset <= 0 or offset % size or offset + length > end:
        return False
    return not any(map(meta.is_metadata, _clusters(offset, length, meta.cluster_bits)))


def _mark_bitmaps(meta: MetadataMap, header: Qcow2Header, read: Reader, file_size: int) -> None:
    """The bitmap directory, each bitmap's table and the data clusters it names."""
    try:
        directory = bitmap_directory(header, read, file_size)
        if directory is None or not directory.size:
            return
        if not _fresh_range(meta, directory.offset, directory.size, file_size):
            meta.findings.append(
                f"bitmap directory ({directory.size} bytes at {directory.offset:#x}) is "
                "outside the file or overlaps other metadata"
            )
            return
        meta.add_range(directory.offset, directory.size, Kind.BITMAP_DIRECTORY)
        data = read(directory.offset, directory.size)
        for table in bitmap_tables(directory, data):
            _mark_bitmap_table(meta, table, read, file_size)
    except BitmapInvalid as err:
        meta.findings.append(err.detail)


def _mark_bitmap_table(meta: MetadataMap, table: BitmapTable, read: Reader, file_size: int) -> None:
    size = 1 << meta.cluster_bits
    what = f"bitmap {table.number} table"
    try:
        check_bitmap_table(table, size, what)
        if not table.size:
            return
        if not _fresh_range(meta, table.offset, table.size * 8, file_size):
            meta.findings.append(f"{what} at {table.offset:#x} is outside the file or overlaps")
            return
        meta.add_range(table.offset, table.size * 8, Kind.BITMAP_TABLE)
    except BitmapInvalid as err:
        meta.findings.append(err.detail)
        return
    for index, entry in enumerate(decode_table(read(table.offset, table.size * 8))):
        _mark_bitmap_data(meta, entry, f"{what} entry {index}", file_size)


def _mark_bitmap_data(meta: MetadataMap, entry: int, what: str, file_size: int) -> None:
    size = 1 << meta.cluster_bits
    try:
        offset = bitmap_data(entry, size, what)
    except BitmapInvalid as err:
        meta.findings.append(f"{err.detail} is invalid")
        return
    if not offset:
        return
    cluster = offset >> meta.cluster_bits
    old = meta.kind_of(cluster)
    if not _valid(offset, size, file_size):
        meta.findings.append(f"{what} ({entry:#x}) is past the end")
    elif old is not None:
        meta.findings.append(f"{what}: {offset:#x} is {old.label}")
    else:
        meta.add(cluster, Kind.BITMAP_DATA)
