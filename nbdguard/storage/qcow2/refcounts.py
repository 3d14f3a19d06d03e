"""Cluster reference counts of a writable qcow2 image, and cluster allocation.

Changes are made in memory and written at a flush (refcount blocks, then the table, then —
if the table moved — the header) before any L2/L1 entry that needs them, so
on disk a refcount is never lower than the number of references to its cluster: a crash
leaves at most leaked clusters. Decrements wait in `pending_frees` until the entries that
referenced the clusters are durably gone (`apply_frees`), and a cluster is reused only
after that.

Allocation is bounded whatever the image holds. Three sources, in order:
- the free index: runs freed since open below the scan cursor (O(1) first fit by size class);
- the scan: refcount entries of the clusters *inside the file* at open, read from a cursor
  that only moves forward, a bounded number of entries per call, by bytes operations (no
  Python loop per entry);
- the frontier: clusters past the end of the file at open. Nothing can live there, so they
  are free whatever their refcount entries claim (a crash can leave such claims; `qemu-img
  check` ignores them too), and the entry is overwritten when the cluster is taken.
A refcount table crafted so that every block is full therefore costs one bounded scan of
the file's own clusters, spread over requests, never a walk over the blocks' claims.

Refcount blocks are cached within a byte budget: clean blocks are evicted oldest first, and
past the budget the oldest dirty blocks are written back early. Writing a refcount block
early is always safe (a count on disk is then higher than its references, or its decrement
is already durable); the next flush syncs them before any L2/L1 entry is written.
"""

from __future__ import annotations

import errno
import itertools
import struct
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from nbdguard.errors import Qcow2Corrupt
from nbdguard.storage.qcow2.header import MAX_HOST_OFFSET, MAX_REFCOUNT_TABLE_BYTES, Qcow2Header
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.qcow2.metadata import Kind, MetadataMap

TABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
_HEADER_TABLE_FIELDS = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters
_HEADER_AT = 48  # where those two fields are in the header

REFCOUNT_CACHE_BYTES = 16 << 20  # cached refcount blocks per image, dirty or clean
# Work one allocation's scan may do, in entries or bytes of refcount data, whichever is more:
# flags cost at most ~5 ns per unit at every refcount width (1-bit: per entry; 64-bit: per
# byte), so this is about 2.5 ms, and a full 64 KiB block of 16-bit counts is 65536 units.
SCAN_BUDGET = 1 << 19
SCAN_WINDOW = 1 << 16  # entries turned into flags at a time
WRITE_BACK_BYTES = 1 << 20  # dirty blocks written back at a time once past the budget


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


def _sub_byte_tables(bits: int) -> list[bytes]:
    """For entries narrower than a byte: one translate table per entry position in a byte,
    mapping the byte to 1 where that entry is non-zero."""
    mask = (1 << bits) - 1
    return [
        bytes(1 if (value >> shift) & mask else 0 for value in range(256))
        for shift in range(0, 8, bits)
    ]


_SUB_BYTE = {bits: _sub_byte_tables(bits) for bits in (1, 2, 4)}


def used_flags(data: bytes | bytearray, bits: int) -> bytes:
    """One byte per refcount entry of `data` (whole entries, whole bytes): 0 where the
    entry is 0. Built with C-speed bytes and int operations, so a free entry is then found
    with `bytes.find` and a run of them with `find(b"\\0" * count)`."""
    if bits == 8:
        return bytes(data)
    if bits > 8:
        width = bits // 8
        merged = 0
        for lane in range(width):  # an entry is 0 iff every one of its bytes is
            merged |= int.from_bytes(data[lane::width], "big")
        return merged.to_bytes(len(data) // width, "big")
    per_byte = 8 // bits
    out = bytearray(len(data) * per_byte)
    for position, table in enumerate(_SUB_BYTE[bits]):
        out[position::per_byte] = data.translate(table)
    return bytes(out)


class FreeRanges:
    """Runs of free clusters the scan will not find again (freed below its cursor, or past
    the end of the file at open). Neighbouring runs merge; `take` is first fit over size
    classes (class k holds runs of 2**k to 2**(k+1)-1 clusters): O(1) in the number of runs."""

    def __init__(self) -> None:
        self._by_start: dict[int, int] = {}  # start -> length
        self._by_end: dict[int, int] = {}  # end (exclusive) -> start
        self._classes: list[dict[int, None]] = [{} for _ in range(64)]

    def __len__(self) -> int:
        return len(self._by_start)

    def clusters(self) -> int:
        return sum(self._by_start.values())

    def _insert(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        self._classes[length.bit_length() - 1][start] = None

    def _remove(self, start: int) -> int:
        length = self._by_start.pop(start)
        del self._by_end[start + length]
        del self._classes[length.bit_length() - 1][start]
        return length

    def add(self, start: int, length: int) -> None:
        before = self._by_end.get(start)
        if before is not None:
            length += self._remove(before)
            start = before
        if start + length in self._by_start:
            length += self._remove(start + length)
        self._insert(start, length)

    def take(self, count: int) -> int | None:
        """The start of `count` clusters removed from one run, or None. Runs of count's own
        class may be too short: a few of them are tried, then any run of a larger class."""
        if not self._by_start:
            return None
        own = count.bit_length() - 1
        tried = itertools.islice(self._classes[own], 8)
        start = next((s for s in tried if self._by_start[s] >= count), None)
        if start is None:
            larger = (c for c in self._classes[own + 1 :] if c)
            runs = next(larger, None)
            if runs is None:
                return None
            start = next(iter(runs))
        length = self._remove(start)
        if length > count:
            self._insert(start + count, length - count)
        return start


@dataclass(slots=True)
class RefcountWrites:
    blocks: list[tuple[int, bytes]]  # (host offset, block)
    table: tuple[int, bytes] | None  # (host offset, whole table) when it changed
    moved_from: tuple[int, int] | None  # the old table (offset, clusters) once switched
    frees: list[tuple[int, int]]  # decrements that wait for this flush's L2/L1 writes
    dirty_indexes: set[int]
    sync: bool = False  # blocks were written back since the last flush: sync them

    @property
    def empty(self) -> bool:
        return not self.blocks and self.table is None and not self.sync


class Refcounts:
    def __init__(
        self,
        host: HostFile,
        header: Qcow2Header,
        metadata: MetadataMap | None = None,
        *,
        cache_bytes: int = REFCOUNT_CACHE_BYTES,
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
        self.table_dirty = False
        self.table_moved_from: tuple[int, int] | None = None  # old (offset, clusters)
        self.pending_frees: list[tuple[int, int]] = []  # (host offset, clusters)
        # The cache: every cached block, the evictable ones (clean, oldest first), the dirty
        # ones (oldest first), and the ones a flush in progress captured.
        self.blocks: dict[int, bytearray] = {}
        self._clean: OrderedDict[int, None] = OrderedDict()
        self.dirty_blocks: dict[int, None] = {}
        self._in_flight: set[int] = set()
        self._rewritten: set[int] = set()  # written back while in flight: dirty again after
        self._unsynced = False
        self.cache_limit = max(4, cache_bytes // self.cluster_size)  # blocks
        self._owners: dict[int, int] = {}  # block offset -> the table index that names it
        # Allocation
        self.file_clusters = -(-host.size // self.cluster_size)  # at open
        self.cursor = 1  # below it (and under file_clusters) nothing is free but self.free
        self.frontier = max(1, self.file_clusters)  # from here on, never allocated yet
        self.free = FreeRanges()
        self.scanned = 0  # refcount entries the scan examined (amortization, in tests)
        self.reclaimed = 0  # frontier clusters whose entries claimed them (overwritten)
        self.written_back = 0  # blocks written before a flush because of the budget

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks) or self.table_dirty

    # The block cache

    def _block_offset(self, index: int) -> int:
        """Where table entry `index` says its block is (0: none), checked: reserved bits
        clear, a cluster the metadata map knows as a refcount block, named by no other entry."""
        entry = self.table[index] if index < len(self.table) else 0
        offset = entry & TABLE_OFFSET_MASK
        if not offset:
            return 0
        owner = self._owners.setdefault(offset, index)
        if (
            entry & ~TABLE_OFFSET_MASK
            or owner != index
            or self.metadata.kind_of(offset >> self.cluster_bits) is not Kind.REFCOUNT_BLOCK
        ):
            raise Qcow2Corrupt(
                "refcount_table_entry",
                f"refcount table entry {index} ({entry:#x}) is not a block of its own",
                host_offset=offset,
            )
        return offset

    def _block(self, index: int) -> bytearray | None:
        block = self.blocks.get(index)
        if block is not None:
            if index in self._clean:
                self._clean.move_to_end(index)
            return block
        offset = self._block_offset(index)
        if not offset:
            return None
        block = bytearray(self.host.read(offset, self.cluster_size))
        self._cache(index, block)
        return block

    def _cache(self, index: int, block: bytearray) -> None:
        """Add a clean block, evicting the oldest clean ones past the budget."""
        self.blocks[index] = block
        self._clean[index] = None
        while len(self.blocks) > self.cache_limit and len(self._clean) > 1:
            oldest, _ = self._clean.popitem(last=False)
            del self.blocks[oldest]

    def _mark_dirty(self, index: int) -> None:
        if index not in self.dirty_blocks:
            self._clean.pop(index, None)
            self.dirty_blocks[index] = None
            if len(self.dirty_blocks) > self.cache_limit:
                self._write_back()

    def _write_back(self) -> None:
        """Past the budget: write the oldest dirty blocks now (synced by the next flush)."""
        chunk = max(1, WRITE_BACK_BYTES >> self.cluster_bits)
        for index in list(self.dirty_blocks)[:chunk]:
            self.host.write(self.blocks[index], self.table[index] & TABLE_OFFSET_MASK)
            del self.dirty_blocks[index]
            self.written_back += 1
            if index in self._in_flight:  # the flush may still write its older copy
                self._rewritten.add(index)
            else:
                self._clean[index] = None
        self._unsynced = True

    def _end_flight(self, *, written: bool) -> None:
        """A flush finished: what it captured is clean (if written) and evictable again."""
        for index in self._in_flight:
            if index in self._rewritten or not written:
                self.dirty_blocks.setdefault(index, None)
            elif index not in self.dirty_blocks:
                self._clean[index] = None
        self._in_flight = set()
        self._rewritten = set()

    # Reading and writing single counts

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

    def _writable_block(self, index: int) -> bytearray:
        """The block for `index`, created if need be; fetched last, since making a block
        allocates and may evict others (even a new one, once written back)."""
        if index >= len(self.table):
            self._grow_table(index + 1)
        if self._block(index) is None:
            self._new_block(index)
        block = self._block(index)
        assert block is not None
        return block

    def set(self, cluster: int, value: int) -> None:
        if not 0 <= value <= self.max_value:
            raise OSError(errno.EIO, f"refcount of cluster {cluster} would overflow")
        index, slot = divmod(cluster, self.per_block)
        block = self._writable_block(index)
        self._write_slot(block, slot, value)
        self._mark_dirty(index)

    def add(self, cluster: int, delta: int) -> None:
        self.set(cluster, self.get(cluster) + delta)

    def _set_run(self, start: int, count: int, *, claims: bool) -> None:
        """Refcount 1 for `count` clusters, a block's share at a time. With `claims`, count
        the non-zero entries it overwrites (frontier clusters an image claimed)."""
        cluster = start
        while cluster < start + count:
            index, slot = divmod(cluster, self.per_block)
            stop = min(start + count - cluster, self.per_block - slot) + slot
            block = self._writable_block(index)
            if self.bits >= 8:
                width = self.bits // 8
                old = block[slot * width : stop * width]
                if claims and old.strip(b"\0"):
                    self.reclaimed += 1
                block[slot * width : stop * width] = (1).to_bytes(width, "big") * (stop - slot)
            else:
                for each in range(slot, stop):
                    self.reclaimed += claims and self._read_slot(block, each) != 0
                    self._write_slot(block, each, 1)
            self._mark_dirty(index)
            cluster += stop - slot

    # Allocation

    def _flags(self, index: int, first: int, stop: int) -> bytes:
        """Used-flags of entries [first, stop) of block `index` (the cached copy if any:
        it may be newer than the file); a block that does not exist is all free."""
        block = self.blocks.get(index)
        if block is None:
            offset = self._block_offset(index) if index < len(self.table) else 0
            if not offset:
                return bytes(stop - first)
            block = bytearray(self.host.read(offset, self.cluster_size))
        if self.bits >= 8:
            width = self.bits // 8
            return used_flags(block[first * width : stop * width], self.bits)
        per_byte = 8 // self.bits
        low, high = first // per_byte, -(-stop // per_byte)
        flags = used_flags(block[low:high], self.bits)
        return flags[first - low * per_byte : stop - low * per_byte]

    def _scan(self, count: int) -> int | None:
        """The first run of `count` free clusters from the cursor within the file, within
        SCAN_BUDGET; the cursor keeps what was found full."""
        if self.cursor >= self.file_clusters:
            return None
        needle = bytes(count)
        run_start, run = self.cursor, 0  # a run of free entries reaching the window's end
        position, budget = self.cursor, SCAN_BUDGET
        unit = max(1, self.bits // 8)  # units per entry
        while position < self.file_clusters and budget > 0:
            index, slot = divmod(position, self.per_block)
            stop = min(self.per_block, slot + SCAN_WINDOW, slot + self.file_clusters - position)
            window = self._flags(index, slot, stop)
            budget -= len(window) * unit
            self.scanned += len(window)
            if run:
                lead = len(window) - len(window.lstrip(b"\0"))
                if run + lead >= count:
                    self.cursor = run_start + count
                    return run_start
                run = run + lead if lead == len(window) else 0
            if not run:
                hit = window.find(needle)
                if hit >= 0:
                    self.cursor = position + hit + count
                    return position + hit
                run = len(window) - len(window.rstrip(b"\0"))
                run_start = position + len(window) - run
            position += len(window)
        self.cursor = run_start if run else position
        return None

    def _take(self, count: int) -> tuple[int, bool]:
        """Reserve `count` contiguous free clusters: (first cluster, from the frontier)."""
        start = self.free.take(count)
        if start is None:
            start = self._scan(count)
        if start is not None:
            for cluster in range(start, start + count):
                if self.metadata.is_metadata(cluster):
                    raise Qcow2Corrupt(
                        "refcount_metadata_free",
                        f"refcount of cluster {cluster} is 0 but it holds metadata",
                        host_offset=cluster << self.cluster_bits,
                    )
            return start, False
        return self._take_frontier(count)

    def allocate(self, count: int) -> int:
        """Reserve `count` contiguous clusters with refcount 1; return the host offset."""
        start, frontier = self._take(count)
        self._set_run(start, count, claims=frontier)
        return start << self.cluster_bits

    def _new_block(self, index: int) -> None:
        """Create the refcount block for table entry `index`; it may count itself."""
        block = bytearray(self.cluster_size)
        where, frontier = self._take(1)
        self.table[index] = where << self.cluster_bits
        self.table_dirty = True
        self._owners[where << self.cluster_bits] = index
        self.metadata.add(where, Kind.REFCOUNT_BLOCK)
        self._cache(index, block)
        self._mark_dirty(index)  # before anything else can evict it: it is not on disk
        self._set_run(where, 1, claims=frontier)

    def _grow_table(self, needed: int) -> None:
        """Move the refcount table to a larger place (in memory until a flush writes it):
        at the frontier, sized to describe its own clusters too."""
        entries_per_cluster = self.cluster_size // 8
        entries = max(needed, len(self.table)) * 3 // 2 + entries_per_cluster
        start = self.frontier
        clusters = -(-entries // entries_per_cluster)
        entries = max(entries, -(-(start + clusters) // self.per_block) + 1)
        clusters = -(-entries // entries_per_cluster)
        if clusters * self.cluster_size > MAX_REFCOUNT_TABLE_BYTES:
            raise OSError(errno.ENOSPC, "the refcount table would exceed 8 MiB")
        start, _ = self._take_frontier(clusters)
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
        self._set_run(start, clusters, claims=True)

    def _take_frontier(self, count: int) -> tuple[int, bool]:
        start = self.frontier
        if (start + count) << self.cluster_bits > MAX_HOST_OFFSET:
            raise OSError(errno.ENOSPC, "the image has reached the qcow2 host offset limit")
        self.frontier += count
        return start, True

    def free_later(self, offset: int, clusters: int) -> None:
        self.pending_frees.append((offset, clusters))

    # Durability

    def take_increments(self) -> RefcountWrites:
        """What the next flush must write, captured (and the dirty marks cleared) under the
        image lock, so the I/O can run without it. The captured blocks stay cached until
        the flush ends (a write-back meanwhile must not be overtaken by the older copy)."""
        writes = RefcountWrites(
            blocks=[
                (self.table[index] & TABLE_OFFSET_MASK, bytes(self.blocks[index]))
                for index in sorted(self.dirty_blocks)
            ],
            table=(self.table_offset, table_bytes(self.table)) if self.table_dirty else None,
            moved_from=self.table_moved_from,
            frees=self.pending_frees,
            dirty_indexes=set(self.dirty_blocks),
            sync=self._unsynced,
        )
        self._in_flight = set(self.dirty_blocks)
        self._rewritten = set()
        self.dirty_blocks = {}
        self._unsynced = False
        self.table_dirty = False
        self.table_moved_from = None
        self.pending_frees = []
        return writes

    def give_back(self, writes: RefcountWrites) -> None:
        """A flush failed: what it took is dirty (and pending) again."""
        self._end_flight(written=False)
        self._unsynced = self._unsynced or writes.sync
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
        """The flush that captured `frees` succeeded: drop references whose removal is now
        durable (in memory: the next flush writes the blocks; a decrement lost in a crash is
        only a leak). Runs of clusters counted once and holding no metadata (the common case:
        a trim) are freed a block's share at a time; the rest one by one."""
        self._end_flight(written=True)
        error: Qcow2Corrupt | None = None
        runs, repeated = _cluster_runs(frees, self.cluster_bits)
        for first, count in runs:
            error = self._free_run(first, count) or error
        for cluster in repeated:
            error = self._free_one(cluster) or error
        if error is not None:
            raise error

    def _free_run(self, first: int, count: int) -> Qcow2Corrupt | None:
        error: Qcow2Corrupt | None = None
        cluster, end = first, first + count
        while cluster < end:
            index, slot = divmod(cluster, self.per_block)
            stop = min(end - cluster, self.per_block - slot) + slot
            if not self._free_in_block(index, slot, stop):
                for each in range(cluster, cluster + stop - slot):
                    error = self._free_one(each) or error
            cluster += stop - slot
        return error

    def _free_in_block(self, index: int, slot: int, stop: int) -> bool:
        """Entries [slot, stop) of a block all 1 and no metadata: zero them at once. False
        (nothing done) when that is not the case."""
        if self.bits < 8:
            return False
        block = self._block(index)
        first = index * self.per_block + slot
        if block is None or first == 0:
            return False
        width = self.bits // 8
        ones = (1).to_bytes(width, "big") * (stop - slot)
        if block[slot * width : stop * width] != ones:
            return False
        if any(map(self.metadata.is_metadata, range(first, first + stop - slot))):
            return False
        block[slot * width : stop * width] = bytes(len(ones))
        self._mark_dirty(index)
        self._index_free(first, stop - slot)
        return True

    def _free_one(self, cluster: int) -> Qcow2Corrupt | None:
        value = self.get(cluster)
        held = value == 1 and not self.metadata.release(cluster)
        if value == 0 or cluster == 0 or held:
            # Skipped (a leak at worst); the others are still applied.
            return Qcow2Corrupt(
                "refcount_free",
                f"cluster {cluster} (refcount {value}) cannot be freed",
                host_offset=cluster << self.cluster_bits,
            )
        self.set(cluster, value - 1)
        if value == 1:
            self._index_free(cluster, 1)
        return None

    def _index_free(self, first: int, count: int) -> None:
        """Newly free clusters go to the free index, except those the scan will still see."""
        end = first + count
        if first < self.cursor:
            self.free.add(first, min(end, self.cursor) - first)
        if end > self.file_clusters:
            low = max(first, self.file_clusters)
            self.free.add(low, end - low)


def _cluster_runs(
    frees: list[tuple[int, int]], cluster_bits: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """Frees as sorted runs of distinct clusters, and the clusters freed more than once
    (their further decrements, done one by one)."""
    clusters = sorted(
        cluster
        for offset, count in frees
        for cluster in range(offset >> cluster_bits, (offset >> cluster_bits) + count)
    )
    runs: list[tuple[int, int]] = []
    repeated: list[int] = []
    previous = -2
    for cluster in clusters:
        if cluster == previous:
            repeated.append(cluster)
        elif cluster == previous + 1:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((cluster, 1))
        previous = cluster
    return runs, repeated
