"""Which host clusters of a qcow2 image hold metadata (QEMU's overlap check, as a map).

Built once at open from the header, the active L1 table, the refcount table and the snapshot
table; kept current by the engine when it allocates or frees an L2 table, a refcount block or
a refcount table. Lookups are O(1) (one dict probe), so every host offset taken from metadata
can be checked against it before use: a data cluster, a compressed extent or an allocation
that lands on metadata is corruption, never something to read or write.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from nbdguard.storage.qcow2.header import MAX_HOST_OFFSET, MAX_L1_BYTES, Qcow2Header

L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1_RESERVED = 0x7F00_0000_0000_01FF  # bits 0-8 and 56-62 of an L1 entry
REFTABLE_RESERVED = 0x1FF  # bits 0-8 of a refcount table entry
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
_SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes, then extra data, id, name


class Kind(enum.IntEnum):
    HEADER = 1  # cluster 0: header, extensions, backing name
    L1 = 2
    L2 = 3
    REFCOUNT_TABLE = 4
    REFCOUNT_BLOCK = 5
    SNAPSHOT_TABLE = 6
    SNAPSHOT_L1 = 7
    SNAPSHOT_L2 = 8

    @property
    def label(self) -> str:
        return self.name.lower()


# Kinds the engine never frees: snapshot metadata belongs to the snapshot, not to it.
HELD = frozenset({Kind.HEADER, Kind.SNAPSHOT_TABLE, Kind.SNAPSHOT_L1, Kind.SNAPSHOT_L2})

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
