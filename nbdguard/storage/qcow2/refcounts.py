"""Cluster reference counts of a writable qcow2 image, and cluster allocation.

Changes are made in memory and written at a flush (refcount blocks, then the table, then —
if the table moved — the header) before any L2/L1 entry that needs them, so
on disk a refcount is never lower than the number of references to its cluster: a crash
leaves at most leaked clusters. Decrements wait in `pending_frees` until the entries that
referenced the clusters are durably gone (`apply_frees`), and a cluster is reused only
after that.
"""

from __future__ import annotations

import errno
import struct
from array import array
from dataclasses import dataclass

from nbdguard.errors import Qcow2Corrupt
from nbdguard.storage.qcow2.header import MAX_HOST_OFFSET, MAX_REFCOUNT_TABLE_BYTES, Qcow2Header
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.qcow2.metadata import Kind, MetadataMap

TABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
_HEADER_TABLE_FIELDS = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
_HEADER_AT = 48  # where those two fields are in the header


def load_table(host: HostFile, offset: int, length: int) -> array[int]:
    """A big-endian u64 table as native ints."""
    table = array("Q", bytes(host.read(offset, length)))
    if struct.pack("=H", 1) != struct.pack(">H", 1):
        table.byteswap()
    return table


def table_bytes(table: array[int]) -> bytes:
    if struct.pack("=H", 1) == struct.pack(">H", 1):
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


@dataclass(slots=True)
class RefcountWrites:
    blocks: list[tuple[int, bytes]]  # (host offset, block)
    table: tuple[int, bytes] | None  # (host offset, whole table) when it changed
    moved_from: tuple[int, int] | None  # the old table (offset, clusters) once switched
    frees: list[tuple[int, int]]  # decrements that wait for this flush's L2/L1 writes
    dirty_indexes: set[int]

    @property
    def empty(self) -> bool:
        return not self.blocks and self.table is None


class Refcounts:
    def __init__(
        self, host: HostFile, header: Qcow2Header, metadata: MetadataMap | None = None
    ) -> None:
        self.host = host
        self.metadata = metadata or MetadataMap(header.cluster_bits)
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.bits = 1 << header.refcount_order
        self.max_value = (1 << self.bits) - 1
        self.per_block = self.cluster_size * 8 // self.bits
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.table = load_table(host, self.table_offset, self.table_clusters * self.cluster_size)
        self.blocks: dict[int, bytearray] = {}
        self.dirty_blocks: set[int] = set()
        self.table_dirty = False
        self.table_moved_from: tuple[int, int] | None = None  # old (offset, clusters)
        self.pending_frees: list[tuple[int, int]] = []  # (host offset, clusters)
        self.free_hint = 1  # no free cluster below this one

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks) or self.table_dirty

    # Reading and writing single counts

    def _block(self, index: int) -> bytearray | None:
        block = self.blocks.get(index)
        if block is None:
            offset = self.table[index] & TABLE_OFFSET_MASK if index < len(self.table) else 0
            if offset == 0:
                return None
            if (
                self.table[index] & ~TABLE_OFFSET_MASK
                or self.metadata.kind_of(offset >> self.cluster_bits) is not Kind.REFCOUNT_BLOCK
            ):
                raise Qcow2Corrupt(
                    "refcount_table_entry",
                    f"refcount table entry {index} ({self.table[index]:#x}) is not a block",
                    host_offset=offset,
                )
            block = bytearray(self.host.read(offset, self.cluster_size))
            self.blocks[index] = block
        return block

    def get(self, cluster: int) -> int:
        index, slot = divmod(cluster, self.per_block)
        block = self._block(index)
        if block is None:
            return 0
        return self._read_slot(block, slot)

    def _read_slot(self, block: bytearray, slot: int) -> int:
        if self.bits >= 8:
            width = self.bits // 8
            return int.from_bytes(block[slot * width : (slot + 1) * width], "big")
        bit = slot * self.bits
        return (block[bit >> 3] >> (bit & 7)) & self.max_value

    def _write_slot(self, block: bytearray, slot: int, value: int) -> None:
        if self.bits >= 8:
            width = self.bits // 8
            block[slot * width : (slot + 1) * width] = value.to_bytes(width, "big")
            return
        bit = slot * self.bits
        shift = bit & 7
        byte = block[bit >> 3] & ~(self.max_value << shift) & 0xFF
        block[bit >> 3] = byte | (value << shift)

    def set(self, cluster: int, value: int) -> None:
        if not 0 <= value <= self.max_value:
            raise OSError(errno.EIO, f"refcount of cluster {cluster} would overflow")
        index, slot = divmod(cluster, self.per_block)
        if index >= len(self.table):
            self._grow_table(index + 1)
        block = self._block(index)
        if block is None:
            block = self._new_block(index)
        self._write_slot(block, slot, value)
        self.dirty_blocks.add(index)

    def add(self, cluster: int, delta: int) -> None:
        self.set(cluster, self.get(cluster) + delta)

    # Allocation

    def _find_free(self, count: int) -> int:
        """The first cluster of `count` consecutive free clusters at or after the hint."""
        start = self.free_hint
        while True:
            run = 0
            while run < count and self.get(start + run) == 0:
                if self.metadata.is_metadata(start + run):
                    raise Qcow2Corrupt(
                        "refcount_metadata_free",
                        f"refcount of cluster {start + run} is 0 but it holds metadata",
                        host_offset=(start + run) << self.cluster_bits,
                    )
                run += 1
            if run == count:
                return start
            start += run + 1

    def allocate(self, count: int) -> int:
        """Reserve `count` contiguous clusters with refcount 1; return the host offset."""
        start = self._find_free(count)
        if (start + count) << self.cluster_bits > MAX_HOST_OFFSET:
            raise OSError(errno.ENOSPC, "the image has reached the qcow2 host offset limit")
        self.free_hint = start + count
        for cluster in range(start, start + count):
            self.set(cluster, 1)
        return start << self.cluster_bits

    def _new_block(self, index: int) -> bytearray:
        """Create the refcount block for table entry `index`; it may count itself."""
        block = bytearray(self.cluster_size)
        where = self._find_free(1)
        self.free_hint = where + 1
        self.blocks[index] = block
        self.table[index] = where << self.cluster_bits
        self.table_dirty = True
        self.metadata.add(where, Kind.REFCOUNT_BLOCK)
        self.set(where, 1)
        return block

    def _grow_table(self, needed: int) -> None:
        """Move the refcount table to a larger place (in memory until a flush writes it)."""
        entries_per_cluster = self.cluster_size // 8
        entries = max(needed, len(self.table)) * 3 // 2 + entries_per_cluster
        clusters = -(-entries // entries_per_cluster)
        if clusters * self.cluster_size > MAX_REFCOUNT_TABLE_BYTES:
            raise OSError(errno.ENOSPC, "the refcount table would exceed 8 MiB")
        start = self._find_free(clusters)
        last = start + clusters
        # The new table must also be able to describe its own clusters.
        entries = max(entries, -(-last // self.per_block) + 1)
        clusters = -(-entries // entries_per_cluster)
        start = self._find_free(clusters)
        self.free_hint = start + clusters
        if self.table_moved_from is None:
            self.table_moved_from = (self.table_offset, self.table_clusters)
        else:  # moved twice before a flush: the intermediate table was never used
            self.pending_frees.append((self.table_offset, self.table_clusters))
        self.table.extend([0] * (clusters * entries_per_cluster - len(self.table)))
        self.table_offset = start << self.cluster_bits
        self.table_clusters = clusters
        self.table_dirty = True
        for cluster in range(start, start + clusters):
            self.metadata.add(cluster, Kind.REFCOUNT_TABLE)
            self.set(cluster, 1)

    def free_later(self, offset: int, clusters: int) -> None:
        self.pending_frees.append((offset, clusters))

    # Durability

    def take_increments(self) -> RefcountWrites:
        """What the next flush must write, captured (and the dirty marks cleared) under the
        image lock, so the I/O can run without it."""
        writes = RefcountWrites(
            blocks=[
                (self.table[index] & TABLE_OFFSET_MASK, bytes(self.blocks[index]))
                for index in sorted(self.dirty_blocks)
            ],
            table=(self.table_offset, table_bytes(self.table)) if self.table_dirty else None,
            moved_from=self.table_moved_from,
            frees=self.pending_frees,
            dirty_indexes=set(self.dirty_blocks),
        )
        self.dirty_blocks.clear()
        self.table_dirty = False
        self.table_moved_from = None
        self.pending_frees = []
        return writes

    def give_back(self, writes: RefcountWrites) -> None:
        """A flush failed: what it took is dirty (and pending) again."""
        self.dirty_blocks |= writes.dirty_indexes
        self.table_dirty = self.table_dirty or writes.table is not None
        if writes.moved_from is not None and self.table_moved_from is None:
            self.table_moved_from = writes.moved_from
        self.pending_frees = writes.frees + self.pending_frees

    def write(self, writes: RefcountWrites) -> None:
        """Blocks and table, synced; then, if the table moved, the header switched to it."""
        if writes.empty:
            return
        for offset, data in writes.blocks:
            self.host.write(data, offset)
        if writes.table is not None:
            offset, data = writes.table
            self.host.write(data, offset)
        self.host.sync()
        if writes.moved_from is not None:
            assert writes.table is not None
            clusters = len(writes.table[1]) >> self.cluster_bits
            self.host.write(_HEADER_TABLE_FIELDS.pack(writes.table[0], clusters), _HEADER_AT)
            self.host.sync()
            writes.frees.append(writes.moved_from)

    def apply_frees(self, frees: list[tuple[int, int]]) -> None:
        """Drop references whose removal is now durable (in memory: the next flush writes
        the blocks; a decrement lost in a crash is only a leak)."""
        error: Qcow2Corrupt | None = None
        for offset, clusters in frees:
            first = offset >> self.cluster_bits
            for cluster in range(first, first + clusters):
                value = self.get(cluster)
                held = value == 1 and not self.metadata.release(cluster)
                if value == 0 or cluster == 0 or held:
                    # Skipped (a leak at worst); the others are still applied.
                    error = error or Qcow2Corrupt(
                        "refcount_free",
                        f"cluster {cluster} (refcount {value}) cannot be freed",
                        host_offset=cluster << self.cluster_bits,
                    )
                    continue
                self.set(cluster, value - 1)
                if value == 1:
                    self.free_hint = min(self.free_hint, cluster)
        if error is not None:
            raise error
