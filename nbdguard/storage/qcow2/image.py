"""A qcow2 layer as a BlockDevice: guest reads and writes mapped through L1/L2 tables.

Reads walk the mapping once per request and coalesce runs: a run of host-contiguous data,
or of clusters this layer does not hold (read from the backing device in one call), is one
read; a request that maps to a single such run is returned zero-copy. Writes go in place
only to clusters this layer owns alone (COPIED); anything else (unallocated, zero,
compressed, shared with a snapshot) gets a new cluster filled with the current guest view
around the written bytes. Metadata changes stay in memory until a flush writes them in the
order that keeps the image consistent after a crash (see `refcounts.py`).

L2 tables live in a byte-bounded cache (`l2cache.py`, the export's `metadata_cache`): when
dirty tables leave no room, the least recently used are written back in FLUSH's order
(data and refcounts synced first; the L1 waits for the next FLUSH, so a crash before it
leaks the new tables' clusters at worst) instead of the cache growing. Room is made only
where no table is in use: at the start of each request, and between the pieces of a long
write (`_in_pieces`), so no request adds more tables than were kept free for it.

All public methods take one lock, since `flush` runs in a worker thread; the flush holds it
only to capture what to write, not during its writes and syncs; so does a write-back, which
runs in a worker thread too once the cache nears its limit. One metadata write is in flight
at a time, in the order they asked (`_take_turn`: a flusher looping in a thread must not
starve a write-back or another flush). A request writes back itself, under the lock, only
when the guest dirties tables faster than they are written (back-pressure).
"""

from __future__ import annotations

import errno
import struct
import sys
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from nbdguard.errors import Qcow2Corrupt
from nbdguard.storage.device import (
    DATA,
    HOLE_ZERO,
    BlockDevice,
    Buffer,
    Capabilities,
    Extent,
    FileRange,
)
from nbdguard.storage.qcow2.compressed import compressed_extent, host_clusters, inflate
from nbdguard.storage.qcow2.header import (
    AUTOCLEAR_OFFSET,
    CORRUPT,
    INCOMPATIBLE_OFFSET,
    MAX_HOST_OFFSET,
    Qcow2Header,
)
from nbdguard.storage.qcow2.hostfile import HostFile
from nbdguard.storage.qcow2.l2cache import L2Cache
from nbdguard.storage.qcow2.metadata import L1_RESERVED, Kind, MetadataMap, build_map
from nbdguard.storage.qcow2.refcounts import (
    Refcounts,
    RefcountWrites,
    load_table,
    table_bytes,
)

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
DESCRIPTOR_MASK = (1 << 62) - 1
ZERO_FLAG = 1
ALL_SUBCLUSTERS = 0xFFFF_FFFF
ALL_ZERO_SUBCLUSTERS = ALL_SUBCLUSTERS << 32
SUBCLUSTERS = 32
L2_RESERVED = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61 of a standard L2 entry
L2_KINDS = (Kind.L2, Kind.SNAPSHOT_L2)
# Set in memory on an L2 entry from the file naming a cluster past the file's end at open
# (a reserved bit: every use of the entry refuses it); never written (see `_file_bytes`).
POISON = 1 << 56
MAX_POISONED = 1 << 16  # past-end L2 entries loaded; more: the image is refused as corrupt
_U64 = struct.Struct(">Q")

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reports_corruption(
    method: Callable[Concatenate[Qcow2Image, _P], _R],
) -> Callable[Concatenate[Qcow2Image, _P], _R]:
    """A public method: corruption found while serving it is signalled once, then raised."""

    def wrapper(self: Qcow2Image, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except Qcow2Corrupt as err:
            if not err.reported:
                err.reported = True
                with self._lock:
                    self._signal(err)
            raise

    wrapper.__name__ = method.__name__
    wrapper.__qualname__ = method.__qualname__
    wrapper.__doc__ = method.__doc__
    return wrapper


# What a run of guest bytes maps to
KIND_DATA, KIND_ZERO, KIND_BACKING, KIND_COMPRESSED = range(4)
Segment = tuple[int, int, int, int]  # (kind, guest offset, length, host offset or descriptor)

L2_CACHE_BYTES = 32 << 20  # the default `metadata_cache`
PIECE_TABLES = 64  # L2 tables one piece of a long write may touch (room is kept for them)
WRITE_BACK_BYTES = 1 << 20  # L2 bytes one write-back writes (at least one table): its stall
BLOCK_STATUS_CLUSTERS = 16384  # clusters examined per BLOCK_STATUS request at most
ZERO_CHUNK = 1 << 20


@dataclass(slots=True)
class _MetadataWrites:
    refcounts: RefcountWrites
    tables: list[tuple[int, bytes]]  # L2 tables: (host offset, table)
    l1: bytes | None


class Qcow2Image(BlockDevice):
    def __init__(
        self,
        header: Qcow2Header,
        host: HostFile,
        data: HostFile | None,
        backing: BlockDevice | None,
        *,
        on_close: Callable[[], None] = lambda: None,
        on_corrupt: Callable[[Qcow2Corrupt], None] = lambda err: None,
        metadata_cache: int = L2_CACHE_BYTES,
    ) -> None:
        self.header = header
        self.host = host
        self.data = data or host
        self.external_data = data is not None
        self.backing = backing
        self._on_close = on_close
        self._on_corrupt = on_corrupt
        self.corrupt: Qcow2Corrupt | None = None  # the first corruption found
        self.size = header.size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_bits = header.l2_entries.bit_length() - 1
        self.l2_mask = header.l2_entries - 1
        self.extended = header.extended_l2
        self.words = 2 if self.extended else 1
        self.subcluster_bits = self.cluster_bits - 5
        self.zero_flag = header.version >= 3 and not self.extended
        self.l1 = load_table(host, header.l1_table_offset, header.l1_size * 8)
        self.l1_dirty = False
        # Host offsets read from the file must lie inside it as it was at open: past that
        # end only the engine's own allocations (named by entries it wrote) are valid.
        self._open_end = -(-host.size >> header.cluster_bits) << header.cluster_bits
        # Tables several active L1 entries name: the first entry used keeps it (-1: none yet)
        self._shared_owner = dict.fromkeys(_shared_tables(self.l1), -1)
        self._written_tables: set[int] = set()  # L2 tables the engine changed since open
        # Past-end clusters entries from the file name: never allocated (they would alias)
        self._planted: set[int] = _past_end(self.l1, self._open_end)
        self._poisoned: dict[int, array[int]] = {}  # table -> slots of poisoned entries
        self._poisoned_count = 0  # poisoned on every load so far
        # L1 entries found valid (checked once: what they name stays an L2 table until the
        # entry itself changes, and the engine's own entries are valid by construction)
        self._l1_checked = bytearray(len(self.l1))
        # metadata_cache bounds both caches: most for L2 tables (each maps far less than a
        # refcount block counts), the rest for refcount blocks.
        l2_bytes = metadata_cache * 3 // 4
        self.l2_cache = L2Cache(l2_bytes, self.cluster_size, self._load_table)
        # Room kept free at each safe point: what one piece of a write may add (dirty).
        self._reserve = max(
            1,
            min(PIECE_TABLES, self.l2_cache.limit // 4, WRITE_BACK_BYTES // self.cluster_size),
        )
        self._piece = self._reserve << (self.l2_bits + self.cluster_bits)  # guest bytes
        self._write_back_tables = max(
            self._reserve, min(self.l2_cache.limit // 8, WRITE_BACK_BYTES // self.cluster_size)
        )
        # Past half the cache, a write-back in the background brings the dirty tables down
        # to a quarter, at most this many at once (its capture holds the lock).
        self._background_tables = max(
            self._write_back_tables, 4 * WRITE_BACK_BYTES // self.cluster_size
        )
        self._background = False  # a background write-back is on its way
        self.write_backs = 0  # metadata write-backs made because the cache was full
        self._inflated: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.RLock()
        # Turns to write metadata (flush or write-back), first come first served
        self._turns = threading.Condition(self._lock)
        self._next_turn = 0  # the ticket the next writer takes
        self._serving = 0  # the ticket whose turn it is (its holder is writing)
        writable = not host.file.read_only
        self.metadata: MetadataMap = build_map(
            header,
            host.read,
            host.size,
            self.l1,
            load_table(
                host,
                header.refcount_table_offset,
                header.refcount_table_clusters * self.cluster_size,
            ),
        )
        self.refcounts = (
            Refcounts(host, header, self.metadata, cache_bytes=metadata_cache - l2_bytes)
            if writable
            else None
        )
        self._reuse_epoch = 0  # counts flushes that freed clusters (see read_range)
        self.capabilities = Capabilities(
            read_only=not writable,
            multi_conn=True,
            fast_zero=header.version >= 3,
            sparse_reads=True,
        )
        if writable and header.autoclear:
            # The spec: a writer that does not maintain an autoclear feature (bitmaps, raw
            # data file) clears its bit before the first write, so readers stop trusting it.
            host.write(bytes(8), AUTOCLEAR_OFFSET)
            host.sync()

    # Mapping

    def _load_table(self, offset: int) -> array[int]:
        if offset % self.cluster_size or offset > MAX_HOST_OFFSET:
            raise OSError(errno.EIO, f"L2 table offset {offset:#x} is invalid")
        table = load_table(self.host, offset, self.cluster_size)
        if self.external_data:
            return table
        if offset not in self._written_tables:
            self._check_loaded(offset, table)
        else:  # the engine's: its poisoned entries are the file's still (changing one refuses it)
            for slot in self._poisoned.get(offset, ()):
                table[slot] |= POISON
        return table

    def _check_loaded(self, offset: int, table: array[int]) -> None:
        """A table as the file had it names no data cluster past the file's end at open:
        the allocator may put a cluster there later, which the entry would then alias.
        One vectorised pass per load; compressed words (other bits) only if it trips."""
        words = table[:: self.words]
        if not words or _max_offset(words) < self._open_end:
            return
        frontier = self.refcounts.frontier << self.cluster_bits if self.refcounts else 0
        slots = array("I")
        for index, word in enumerate(words):
            host = word & OFFSET_MASK
            if host >= self._open_end and not word & (COMPRESSED | POISON):
                slots.append(index * self.words)
                table[index * self.words] = word | POISON
                if host >= frontier:
                    self._planted.add(host)
        self._poisoned_count += len(slots)
        if self._poisoned_count > MAX_POISONED:  # bounds what is kept for them
            raise Qcow2Corrupt(
                "l2_entry",
                f"L2 table {offset:#x}: too many entries past the end of the file",
                host_offset=offset,
            )
        if slots:
            self._poisoned[offset] = slots

    def _file_bytes(self, offset: int, table: array[int]) -> bytes:
        """A table as it is written: poisoned entries as the file had them."""
        poisoned = self._poisoned.get(offset)
        if not poisoned:
            return table_bytes(table)
        copy = array("Q", table)
        for slot in poisoned:
            copy[slot] &= ~POISON  # a poisoned word is unchanged: changing it refuses it
        return table_bytes(copy)

    def _allocate(self, count: int) -> int:
        """`count` new clusters, none a past-end cluster a planted entry names (such a run
        is left allocated and unused: a leak, never an alias)."""
        assert self.refcounts is not None
        while True:
            host = self.refcounts.allocate(count)
            end = host + (count << self.cluster_bits)
            if not self._planted or not any(
                at in self._planted for at in range(host, end, self.cluster_size)
            ):
                return host

    # L2 cache room (only where no table is in use: see the module docstring)

    def _room(self) -> None:
        """Keep room for `_reserve` more tables. Past half the cache a write-back starts in
        a worker thread (its syncs must not hold the event loop); only when the guest
        dirties tables faster than they are written does the request write back itself
        (back-pressure). O(1) unless it must."""
        cache = self.l2_cache
        if cache.held > cache.limit // 2:
            self._start_write_back()
        while cache.held + self._reserve > cache.limit:
            self._write_back(max(cache.over(self._reserve), self._write_back_tables))

    def _in_pieces(self, offset: int, length: int, work: Callable[[int, int], None]) -> None:
        """Run `work` on pieces that each touch at most `_reserve` L2 tables, making room
        before each; a piece boundary is a cluster boundary."""
        step = self._piece
        end = offset + length
        position = offset
        while True:
            self._room()
            stop = min(end, (position // step + 1) * step)
            work(position, stop - position)
            position = stop
            if position >= end:
                return

    def _write_back(self, count: int) -> None:
        """Write the `count` least recently used dirty tables now, under the lock, after
        any metadata write in flight (which needs the lock to finish: waiting releases it)."""
        assert self.refcounts is not None
        self._wait_turn(self._take_turn())
        try:
            if self.l2_cache.over(self._reserve):
                writes = self._take_write_back(count)
                try:
                    self._write_tables(writes)
                except BaseException:
                    self._end_write_back(writes, ok=False)
                    raise
                self._end_write_back(writes, ok=True)
        finally:
            self._done_writing()

    def _start_write_back(self) -> None:
        """Start a write-back in a worker thread unless one is on its way. Its turn is
        taken now, so a later flush (close's) waits for it."""
        if self._background or self.refcounts is None:
            return
        self._background = True
        turn = self._take_turn()
        threading.Thread(
            target=self._background_write_back, args=(turn,), name="qcow2-write-back", daemon=True
        ).start()

    def _background_write_back(self, turn: int) -> None:
        """Capture under the lock, write without it (requests go on, as during a flush),
        finish under it. A failure leaves the tables dirty: the next write-back or flush
        writes them again, and reports the error if it persists."""
        with self._lock:
            self._wait_turn(turn)
            try:
                want = self.l2_cache.dirty_count - self.l2_cache.limit // 4
                writes = self._take_write_back(
                    min(self._background_tables, max(self._write_back_tables, want))
                )
            except BaseException:
                self._background = False
                self._done_writing()
                raise
        ok = False
        try:
            if writes.tables:  # else a flush came first: nothing to do
                self._write_tables(writes)
                ok = True
        except OSError:
            pass
        finally:
            with self._lock:
                try:
                    self._end_write_back(writes, ok=ok)
                finally:
                    self._background = False
                    self._done_writing()

    def wait_for_write_back(self) -> None:
        """Return once every write-back started so far has finished."""
        with self._lock:
            self._wait_turn(self._take_turn())
            self._done_writing()

    def _take_write_back(self, count: int) -> _MetadataWrites:
        """What a write-back writes: the `count` least recently used dirty tables (pinned
        until written) and every refcount change; the L1 waits for a flush."""
        assert self.refcounts is not None
        taken = self.l2_cache.take_dirty(count)
        tables = [(offset, self._file_bytes(offset, table)) for offset, table in taken]
        return _MetadataWrites(self.refcounts.take_increments(), tables, None)

    def _write_tables(self, writes: _MetadataWrites) -> None:
        """A write-back's I/O, in FLUSH's order: data and refcounts durable before the L2
        tables that refer to them are written, those synced before any L1 write names them
        (the next flush's, which may have no tables of its own)."""
        assert self.refcounts is not None
        if self.external_data:
            self.data.sync()  # data before the entries that expose it
        self.refcounts.write(writes.refcounts)  # synced when it wrote anything
        if writes.refcounts.empty:
            self.host.sync()  # guest data in this file before the entries that expose it
        for offset, table in writes.tables:
            self.host.write(table, offset)
        self.host.sync()

    def _end_write_back(self, writes: _MetadataWrites, *, ok: bool) -> None:
        """Under the lock: written tables are clean, frees wait for the next flush (the L1
        may still name what they free); otherwise everything taken is dirty again."""
        assert self.refcounts is not None
        if not ok:
            self.refcounts.give_back(writes.refcounts)
            self.l2_cache.written(_offsets(writes.tables), ok=False)
            return
        self.refcounts.apply_frees([])  # ends the refcount blocks' flight, frees none
        for offset, clusters in writes.refcounts.frees:
            self.refcounts.free_later(offset, clusters)
        self.l2_cache.written(_offsets(writes.tables), ok=True)
        self.write_backs += 1

    def _take_turn(self) -> int:
        """Under the lock: a ticket for a turn to write metadata, first come first served."""
        self._next_turn += 1
        return self._next_turn - 1

    def _wait_turn(self, turn: int) -> None:
        while self._serving != turn:
            self._turns.wait()

    def _done_writing(self) -> None:
        self._serving += 1
        self._turns.notify_all()

    def _entry(self, cluster: int) -> tuple[int, int]:
        index = cluster >> self.l2_bits
        if index >= len(self.l1):
            return 0, 0
        offset = self._table_of(index)
        if not offset:
            return 0, 0
        table = self.l2_cache.get(offset)
        slot = (cluster & self.l2_mask) * self.words
        return table[slot], table[slot + 1] if self.extended else 0

    def _table_of(self, index: int) -> int:
        """The L2 table L1 entry `index` names (0: none), checked once per entry."""
        if self._l1_checked[index]:
            return self.l1[index] & OFFSET_MASK
        offset = self._l2_offset(index)
        self._l1_checked[index] = 1
        return offset

    def _l2_offset(self, index: int) -> int:
        """The L2 table an L1 entry from the file names (0: none), checked against the
        metadata map, the file's size at open and the other L1 entries (QEMU: two active
        L1 entries may not share a table; a write through one would copy it while the
        other still names it)."""
        entry = self.l1[index]
        offset = entry & OFFSET_MASK
        if not entry & L1_RESERVED and (
            not offset
            or (
                not offset & (self.cluster_size - 1)
                and offset < self._open_end
                and self._claims(offset, index)
                and self.metadata.kind_of(offset >> self.cluster_bits) in L2_KINDS
            )
        ):
            return offset
        shared = " (another L1 entry names it)" if offset in self._shared_owner else ""
        raise Qcow2Corrupt(
            "l1_entry",
            f"L1 entry {index} ({entry:#x}) does not name an L2 table{shared}",
            guest_offset=index << (self.l2_bits + self.cluster_bits),
            host_offset=offset,
        )

    def _claims(self, offset: int, index: int) -> bool:
        """L1 entry `index` may use the table: no other active entry used it first."""
        owner = self._shared_owner.get(offset)
        if owner is None or owner == index:
            return True
        if owner < 0:
            self._shared_owner[offset] = index
            return True
        return False

    def _host_of(self, word: int) -> int:
        """The data cluster a standard L2 entry names: aligned, reserved bits clear, inside
        the file (rounded up to a cluster) and never a metadata cluster."""
        host = word & OFFSET_MASK
        if self.external_data:
            if host & (self.cluster_size - 1) or word & L2_RESERVED:
                raise Qcow2Corrupt("l2_entry", f"L2 entry {word:#x} is invalid", host_offset=host)
            return host
        if not host:
            return 0
        cluster = host >> self.cluster_bits
        if (
            host & (self.cluster_size - 1)
            or word & L2_RESERVED
            or self.metadata.is_metadata(cluster)
            or cluster >= -(-self.host.size >> self.cluster_bits)
        ):
            kind = self.metadata.kind_of(cluster)
            what = f"is {kind.label}" if kind is not None else "is unaligned or past the end"
            raise Qcow2Corrupt(
                "l2_entry", f"L2 entry {word:#x}: data cluster {what}", host_offset=host
            )
        return host

    def _check_compressed(self, descriptor: int) -> None:
        """A compressed cluster's bytes lie inside the file and outside all metadata."""
        extent = compressed_extent(descriptor, self.cluster_bits)
        # The engine writes no compressed cluster: each lies inside the file as opened.
        bad = self.external_data or extent.offset + extent.length > self._open_end
        for cluster in host_clusters(extent, self.cluster_bits):
            bad = bad or self.metadata.is_metadata(cluster)
        if bad:
            raise Qcow2Corrupt(
                "compressed_entry",
                f"compressed cluster ({extent.length} bytes at {extent.offset:#x}) overlaps "
                "metadata or lies past the end of the file",
                host_offset=extent.offset,
            )

    def _allocated(self, word: int) -> bool:
        """A standard descriptor with a host cluster (offset 0 is valid with a data file)."""
        return bool(word & OFFSET_MASK) or (self.external_data and bool(word & COPIED))

    def _segments(self, offset: int, length: int) -> list[Segment]:
        """Map guest bytes to coalesced runs of one kind."""
        segments: list[Segment] = []
        end = offset + length
        position = offset
        while position < end:
            cluster = position >> self.cluster_bits
            within = position & (self.cluster_size - 1)
            count = min(self.cluster_size - within, end - position)
            word, bitmap = self._entry(cluster)
            if word & COMPRESSED:
                self._check_compressed(word & DESCRIPTOR_MASK)
                _append(segments, (KIND_COMPRESSED, position, count, word & DESCRIPTOR_MASK))
            elif self.extended:
                self._subcluster_segments(segments, position, count, word, bitmap)
            elif self.zero_flag and word & ZERO_FLAG:
                _append(segments, (KIND_ZERO, position, count, 0))
            elif self._allocated(word):
                _append(segments, (KIND_DATA, position, count, self._host_of(word) + within))
            else:
                _append(segments, (KIND_BACKING, position, count, 0))
            position += count
        return segments

    def _subcluster_segments(
        self, segments: list[Segment], position: int, count: int, word: int, bitmap: int
    ) -> None:
        host = self._host_of(word)
        end = position + count
        size = 1 << self.subcluster_bits
        while position < end:
            within = position & (self.cluster_size - 1)
            sub = within >> self.subcluster_bits
            piece = min(size - (within & (size - 1)), end - position)
            if bitmap >> sub & 1:
                if not self._allocated(word):
                    raise OSError(errno.EIO, "allocated subcluster without a host cluster")
                _append(segments, (KIND_DATA, position, piece, host + within))
            elif bitmap >> (sub + SUBCLUSTERS) & 1:
                _append(segments, (KIND_ZERO, position, piece, 0))
            else:
                _append(segments, (KIND_BACKING, position, piece, 0))
            position += piece

    # Reads

    @_reports_corruption
    def pread(self, offset: int, length: int) -> Buffer:
        with self._lock:
            self._room()
            return self._read(offset, length)

    def _read(self, offset: int, length: int) -> Buffer:
        """The guest's bytes (reads only add clean tables, evicted as needed: no room kept)."""
        segments = self._segments(offset, length)
        if len(segments) == 1:
            kind, _, _, host = segments[0]
            if kind == KIND_DATA:
                return self.data.read(host, length)
            if kind == KIND_BACKING and self.backing and offset + length <= self.backing.size:
                return self.backing.pread(offset, length)
        out = bytearray(length)
        view = memoryview(out)
        for kind, position, count, host in segments:
            target = view[position - offset : position - offset + count]
            self._fill(target, kind, position, host)
        return out

    @_reports_corruption
    def read_range(self, offset: int, length: int) -> FileRange | None:
        """The host file range when the bytes are one run of this layer's data clusters (or
        wholly the backing layer's range). A reply may wait before it is sent, and a cluster
        can meanwhile be freed and reused for another guest offset; frees only take effect
        in flush(), which counts them, so a range whose count moved is read again through
        the mapping (its `recheck`). Read-only images never free anything."""
        with self._lock:
            self._room()
            segments = self._segments(offset, length)
            if len(segments) != 1:
                return None
            kind, _, _, host = segments[0]
            if kind == KIND_BACKING and self.backing and offset + length <= self.backing.size:
                return self.backing.read_range(offset, length)
            if kind != KIND_DATA or host + length > self.data.size:
                return None
            if self.refcounts is None:
                return FileRange(self.data.fd, host, length)
            epoch = self._reuse_epoch

            def recheck() -> Buffer | None:
                return None if self._reuse_epoch == epoch else self.pread(offset, length)

            return FileRange(self.data.fd, host, length, recheck)

    def _fill(self, target: memoryview, kind: int, position: int, host: int) -> None:
        if kind == KIND_DATA:
            self.data.read_into(target, host)
        elif kind == KIND_BACKING:
            self._read_backing_into(target, position)
        elif kind == KIND_COMPRESSED:
            within = position & (self.cluster_size - 1)
            target[:] = self._inflate(host)[within : within + len(target)]
        # KIND_ZERO: the buffer is already zeros

    def _read_backing_into(self, target: memoryview, position: int) -> None:
        if self.backing is None or position >= self.backing.size:
            return
        count = min(len(target), self.backing.size - position)
        target[:count] = self.backing.pread(position, count)

    def _inflate(self, descriptor: int) -> bytes:
        cluster = self._inflated.get(descriptor)
        if cluster is None:
            extent = compressed_extent(descriptor, self.cluster_bits)
            raw = bytes(self.host.read(extent.offset, extent.length))
            cluster = inflate(raw, self.cluster_size, self.header.compression_type)
            self._inflated[descriptor] = cluster
            if len(self._inflated) > 8:
                self._inflated.popitem(last=False)
        return cluster

    # Writes

    @_reports_corruption
    def pwrite(self, data: Buffer, offset: int) -> None:
        with self._lock:
            self._refuse_if_corrupt()
            view = memoryview(data).cast("B")
            if len(view) <= self._piece - offset % self._piece:  # one piece: the common case
                self._room()
                self._write(view, offset)
                return
            self._in_pieces(
                offset, len(view), lambda at, count: self._write(view[at - offset :][:count], at)
            )

    def partial_write_unit(self, offset: int) -> int:
        """Parts that end on cluster boundaries allocate (and copy on write) exactly what the
        whole write would have."""
        return self.cluster_size

    def _write(self, view: memoryview, offset: int) -> None:
        """Write table by table: each L2 table is made writable once per request."""
        span = 1 << (self.l2_bits + self.cluster_bits)
        done = 0
        while done < len(view):
            position = offset + done
            stop = min(offset + len(view), (position // span + 1) * span)
            table_offset, table = self._writable_table(
                position >> (self.l2_bits + self.cluster_bits)
            )
            self._write_in_table(table_offset, table, view[done : stop - offset], position)
            done = stop - offset

    def _in_place(self, word: int, bitmap: int) -> bool:
        if not word & COPIED or word & COMPRESSED or not self._allocated(word):
            return False
        if self.extended:
            return bitmap & ALL_SUBCLUSTERS == ALL_SUBCLUSTERS
        return not (self.zero_flag and word & ZERO_FLAG)

    def _write_in_table(
        self, table_offset: int, table: array[int], view: memoryview, offset: int
    ) -> None:
        """Write one table's share of a request (the table is marked dirty before any of its
        entries changes)."""
        first = offset >> self.cluster_bits
        last = (offset + len(view) - 1) >> self.cluster_bits
        cluster = first
        while cluster <= last:
            word, bitmap = self._words(table, cluster)
            in_place = self._in_place(word, bitmap)
            stop = cluster + 1
            while stop <= last:
                next_word, next_bitmap = self._words(table, stop)
                if self._in_place(next_word, next_bitmap) != in_place:
                    break
                contiguous = (stop - cluster) << self.cluster_bits
                if in_place and self._host_of(next_word) != self._host_of(word) + contiguous:
                    break
                stop += 1
            start_byte = max(offset, cluster << self.cluster_bits)
            stop_byte = min(offset + len(view), stop << self.cluster_bits)
            piece = view[start_byte - offset : stop_byte - offset]
            if in_place:
                within = start_byte & (self.cluster_size - 1)
                self.data.write(piece, self._host_of(word) + within)
            else:
                self.l2_cache.mark_dirty(table_offset)
                self._write_new_clusters(table, cluster, stop, piece, start_byte)
            cluster = stop

    def _words(self, table: array[int], cluster: int) -> tuple[int, int]:
        slot = (cluster & self.l2_mask) * self.words
        return table[slot], table[slot + 1] if self.extended else 0

    def _write_new_clusters(
        self, table: array[int], first: int, stop: int, piece: memoryview, start_byte: int
    ) -> None:
        """Give clusters [first, stop) fresh host clusters holding guest view + new bytes."""
        count = stop - first
        base = first << self.cluster_bits
        buffer = bytearray(count << self.cluster_bits)
        head = start_byte - base
        tail = head + len(piece)
        if head:
            self._guest_cluster_into(buffer, 0, first)
        if tail < len(buffer) and not (count == 1 and head):
            last = stop - 1
            self._guest_cluster_into(buffer, (last - first) << self.cluster_bits, last)
        buffer[head:tail] = piece
        for index in range(count):  # every old entry checked before anything changes
            self._check_release(table[((first + index) & self.l2_mask) * self.words])
        host = self._allocate_data(first, count)
        self.data.write(buffer, host)
        for index in range(count):
            slot = ((first + index) & self.l2_mask) * self.words
            self._release(table[slot])
            table[slot] = (host + (index << self.cluster_bits)) | COPIED
            if self.extended:
                table[slot + 1] = ALL_SUBCLUSTERS

    def _guest_cluster_into(self, buffer: bytearray, at: int, cluster: int) -> None:
        position = cluster << self.cluster_bits
        count = min(self.cluster_size, self.size - position)
        if count > 0:
            buffer[at : at + count] = self._read(position, count)

    def _allocate_data(self, first: int, count: int) -> int:
        if self.external_data:
            return first << self.cluster_bits  # host offset == guest offset, not refcounted
        assert self.refcounts is not None
        return self._allocate(count)

    def _check_release(self, word: int) -> None:
        """What an entry names may be released: valid, and counted at least once."""
        assert self.refcounts is not None
        if word & COMPRESSED:
            self._check_compressed(word & DESCRIPTOR_MASK)
            return
        host = self._host_of(word)
        if host and not self.external_data and self.refcounts.get(host >> self.cluster_bits) == 0:
            raise Qcow2Corrupt(
                "refcount_zero",
                f"data cluster {host:#x} is in use but its refcount is 0",
                host_offset=host,
            )

    def _release(self, word: int) -> None:
        """Drop this layer's reference to what an entry pointed at (applied after a flush)."""
        assert self.refcounts is not None
        self._check_release(word)
        if word & COMPRESSED:
            extent = compressed_extent(word & DESCRIPTOR_MASK, self.cluster_bits)
            for cluster in host_clusters(extent, self.cluster_bits):
                self.refcounts.free_later(cluster << self.cluster_bits, 1)
        elif not self.external_data and word & OFFSET_MASK:
            self.refcounts.free_later(self._host_of(word), 1)

    def _writable_table(self, index: int) -> tuple[int, array[int]]:
        """The L2 table for L1 entry `index`, owned by the active L1 alone (copy if shared)."""
        assert self.refcounts is not None
        if index >= len(self.l1):
            raise OSError(errno.EIO, "write beyond the L1 table")
        entry = self.l1[index]
        old = self._table_of(index)
        if old and entry & COPIED:
            table = self.l2_cache.get(old)  # checked on a load: before it is the engine's
            self._written_tables.add(old)  # its entries may change: no longer the file's
            return old, table
        table = array("Q", self.l2_cache.get(old)) if old else array("Q", bytes(self.cluster_size))
        new = self._allocate(1)
        self.metadata.add(new >> self.cluster_bits, Kind.L2)
        if old:
            self.refcounts.free_later(old, 1)
            if not self.l2_cache.is_dirty(old):  # a dirty table is written, never dropped
                self.l2_cache.discard(old)
        self._written_tables.add(new)
        if old in self._poisoned:
            self._poisoned[new] = array("I", self._poisoned[old])
        self.l2_cache.insert(new, table, dirty=True)
        self.l1[index] = new | COPIED
        self._l1_checked[index] = 1
        self.l1_dirty = True
        return new, table

    # Corruption

    def _refuse_if_corrupt(self) -> None:
        if self.corrupt is not None:
            raise OSError(errno.EROFS, "the qcow2 image is marked corrupt: read-only")

    def _signal(self, err: Qcow2Corrupt) -> None:
        """QEMU's qcow2_signal_corruption: on the first impossible entry, set the header's
        corrupt bit (v3, writable) and refuse writes from then on; report every one."""
        if self.corrupt is None:
            self.corrupt = err
            if self.refcounts is not None and self.header.version >= 3:
                try:
                    (value,) = _U64.unpack(self.host.read(INCOMPATIBLE_OFFSET, 8))
                    self.host.write(_U64.pack(value | CORRUPT), INCOMPATIBLE_OFFSET)
                    self.host.sync()
                except OSError:
                    pass  # still read-only in memory; the report says what happened
        self._on_corrupt(err)

    # Zeroing

    @_reports_corruption
    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        with self._lock:
            self._refuse_if_corrupt()
            if fast:
                self._check_fast(offset, length)  # before any piece is zeroed

            def zero(at: int, count: int) -> None:
                if self.header.version < 3:
                    self._zero_v2(at, count, may_trim=may_trim, fast=fast)
                    return
                first, stop = self._whole_clusters(at, count)
                self._zero_edges(at, count, first, stop, fast=fast)
                self._zero_clusters(first, stop, discard=may_trim)

            self._in_pieces(offset, length, zero)

    @_reports_corruption
    def trim(self, offset: int, length: int) -> None:
        with self._lock:
            self._refuse_if_corrupt()
            if self.header.version < 3 and self.backing is not None:
                return  # nothing may expose the backing data; TRIM is advisory

            def unmap(at: int, count: int) -> None:
                first, stop = self._whole_clusters(at, count)
                if self.header.version >= 3:
                    self._zero_clusters(first, stop, discard=True)
                else:
                    self._unmap_clusters(first, stop)

            self._in_pieces(offset, length, unmap)

    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """The clusters the range covers entirely (the image's last, short cluster counts)."""
        first = -(-offset >> self.cluster_bits)
        end = offset + length
        stop = -(-self.size >> self.cluster_bits) if end >= self.size else end >> self.cluster_bits
        return first, max(first, stop)

    def _check_fast(self, offset: int, length: int) -> None:
        """A fast zero must not write data (nor need to): refuse it before doing anything."""
        if self.header.version < 3:
            raise OSError(errno.ENOTSUP, "qcow2 version 2 has no zero clusters")
        first, stop = self._whole_clusters(offset, length)
        if self._edges(offset, length, first, stop):
            raise OSError(errno.ENOTSUP, "zeroing part of a cluster would not be fast")

    def _edges(self, offset: int, length: int, first: int, stop: int) -> list[tuple[int, int]]:
        """The parts of the range outside the whole clusters [first, stop)."""
        end = offset + length
        if first >= stop:
            pieces = [(offset, length)]
        else:
            pieces = [
                (offset, (first << self.cluster_bits) - offset),
                (stop << self.cluster_bits, end - (stop << self.cluster_bits)),
            ]
        return [(start, count) for start, count in pieces if count > 0]

    def _zero_edges(self, offset: int, length: int, first: int, stop: int, *, fast: bool) -> None:
        pieces = self._edges(offset, length, first, stop)
        if pieces and fast:
            raise OSError(errno.ENOTSUP, "zeroing part of a cluster would not be fast")
        for start, count in pieces:
            self._write(memoryview(bytes(count)), start)

    def _zero_clusters(self, first: int, stop: int, *, discard: bool) -> None:
        cluster = first
        while cluster < stop:
            index = cluster >> self.l2_bits
            table_end = min(stop, (index + 1) << self.l2_bits)
            if self.backing is None and not self.l1[index] & OFFSET_MASK:
                cluster = table_end  # unallocated without a backing file already reads zeros
                continue
            table_offset, table = self._writable_table(index)
            self.l2_cache.mark_dirty(table_offset)  # before entries change: a failure keeps them
            for each in range(cluster, table_end):
                self._zero_entry(table, (each & self.l2_mask) * self.words, discard=discard)
            cluster = table_end

    def _zero_entry(self, table: array[int], slot: int, *, discard: bool) -> None:
        word = table[slot]
        keep = not discard and word & COPIED and not word & COMPRESSED and self._allocated(word)
        if keep:
            self._host_of(word)  # kept: must be valid
        else:
            self._release(word)
        host = (word & OFFSET_MASK) | COPIED if keep else 0
        if self.extended:
            table[slot] = host
            table[slot + 1] = ALL_ZERO_SUBCLUSTERS
        elif self.backing is None and not keep:
            table[slot] = 0
        else:
            table[slot] = host | ZERO_FLAG

    def _zero_v2(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        if fast:
            raise OSError(errno.ENOTSUP, "qcow2 version 2 has no zero clusters")
        first, stop = self._whole_clusters(offset, length)
        if may_trim and self.backing is None and first < stop:
            self._zero_edges(offset, length, first, stop, fast=False)
            self._unmap_clusters(first, stop)
            return
        position = offset
        while position < offset + length:
            count = min(ZERO_CHUNK, offset + length - position)
            self._write(memoryview(bytes(count)), position)
            position += count

    def _unmap_clusters(self, first: int, stop: int) -> None:
        for cluster in range(first, stop):
            index = cluster >> self.l2_bits
            if not self.l1[index] & OFFSET_MASK:
                continue
            table_offset, table = self._writable_table(index)
            self.l2_cache.mark_dirty(table_offset)
            slot = (cluster & self.l2_mask) * self.words
            self._release(table[slot])
            table[slot] = 0

    # Durability

    @_reports_corruption
    def flush(self) -> None:
        """Make every completed write durable, in the order that keeps the image consistent
        after a crash: refcounts, then L2 tables, then L1, each synced before the next refers
        to it; only then are released clusters freed (in memory; written by the next flush).

        What to write is captured under the image lock; the writes and syncs run without it
        (requests go on meanwhile), and one metadata write at a time (a later one must not be
        overtaken by an earlier one's older copy of a table). The tables captured stay
        cached (pinned) until their write is done: reloaded earlier, they would be stale.
        """
        if self.refcounts is None:
            return
        with self._lock:
            self._wait_turn(self._take_turn())
            try:
                writes = self._take_metadata()
            except BaseException:
                self._done_writing()
                raise
        try:
            self._write_metadata(writes)
        except BaseException:
            with self._lock:
                self._give_back(writes)
                self._done_writing()
            raise
        with self._lock:
            try:
                self.l2_cache.written(_offsets(writes.tables), ok=True)
                if writes.refcounts.frees:
                    self._reuse_epoch += 1  # before any freed cluster can be allocated again
                self.refcounts.apply_frees(writes.refcounts.frees)
            finally:
                self._done_writing()

    def _take_metadata(self) -> _MetadataWrites:
        assert self.refcounts is not None
        taken = self.l2_cache.take_dirty()
        tables = [(offset, self._file_bytes(offset, table)) for offset, table in taken]
        l1 = table_bytes(self.l1) if self.l1_dirty else None
        self.l1_dirty = False
        return _MetadataWrites(self.refcounts.take_increments(), tables, l1)

    def _give_back(self, writes: _MetadataWrites) -> None:
        assert self.refcounts is not None
        self.refcounts.give_back(writes.refcounts)
        self.l2_cache.written(_offsets(writes.tables), ok=False)
        self.l1_dirty = self.l1_dirty or writes.l1 is not None

    def _write_metadata(self, writes: _MetadataWrites) -> None:
        assert self.refcounts is not None
        if self.external_data and writes.tables:
            self.data.sync()  # data before the entries that expose it
        self.refcounts.write(writes.refcounts)
        for offset, data in writes.tables:
            self.host.write(data, offset)
        if writes.l1 is not None:
            if writes.tables:
                self.host.sync()
            self.host.write(writes.l1, self.header.l1_table_offset)
        self.host.sync()

    def cache(self, offset: int, length: int) -> None:
        """Advisory; the host page cache already serves repeated reads."""

    # Block status

    def block_status(self, offset: int, length: int, max_extents: int) -> list[Extent]:
        """base:allocation: this layer's data and zeros, the layer below elsewhere."""

        def below(position: int, count: int, limit: int) -> list[Extent]:
            assert self.backing is not None
            return self.backing.block_status(position, count, limit)

        def ours(kind: int) -> int:
            return HOLE_ZERO if kind == KIND_ZERO else DATA

        return self._status(
            offset,
            length,
            max_extents,
            ours=ours,
            below=below,
            relabel=lambda flags: flags,
            past_end=HOLE_ZERO,
        )

    def allocation_depth(self, offset: int, length: int, max_extents: int) -> list[Extent]:
        """qemu:allocation-depth: 1 where this layer holds the bytes, below it one more
        than the layer below says, 0 where none does."""

        def below(position: int, count: int, limit: int) -> list[Extent]:
            assert self.backing is not None
            return self.backing.allocation_depth(position, count, limit)

        def deeper(depth: int) -> int:
            return depth + 1 if depth else 0

        past_end = 2 if self.backing is not None else 0  # a short layer below: QEMU's count
        return self._status(
            offset,
            length,
            max_extents,
            ours=lambda kind: 1,
            below=below,
            relabel=deeper,
            past_end=past_end,
        )

    @_reports_corruption
    def _status(
        self,
        offset: int,
        length: int,
        max_extents: int,
        *,
        ours: Callable[[int], int],
        below: Callable[[int, int, int], list[Extent]],
        relabel: Callable[[int], int],
        past_end: int,
    ) -> list[Extent]:
        with self._lock:
            self._room()
            length = min(length, BLOCK_STATUS_CLUSTERS << self.cluster_bits)
            extents: list[Extent] = []
            for kind, position, count, _ in self._segments(offset, length):
                if kind == KIND_BACKING:
                    run = (position, count, max_extents)
                    self._status_below(extents, run, below, relabel, past_end)
                else:
                    _add_extent(extents, count, ours(kind))
                if len(extents) > max_extents:
                    break
            return extents[:max_extents]

    def _status_below(
        self,
        extents: list[Extent],
        run: tuple[int, int, int],
        below: Callable[[int, int, int], list[Extent]],
        relabel: Callable[[int], int],
        past_end: int,
    ) -> None:
        """Extents of a run this layer does not hold, from the layer below; past the end of
        that layer (or without one) the bytes read as zeros and get `past_end`."""
        position, count, limit = run
        end = position + count
        backing_end = min(end, self.backing.size) if self.backing is not None else position
        while position < backing_end and len(extents) <= limit:
            for reported, value in below(position, backing_end - position, limit):
                length = min(reported, backing_end - position)
                _add_extent(extents, length, relabel(value))
                position += length
                if position >= backing_end:
                    break
        if position < end and len(extents) <= limit:
            _add_extent(extents, end - max(position, backing_end), past_end)

    def close(self) -> None:
        try:
            if self.refcounts is not None:
                self.flush()
                self.flush()  # writes the decrements the first one applied: no leaks
        finally:
            self.host.close()
            if self.external_data:
                self.data.close()
            if self.backing is not None:
                self.backing.close()
            self._on_close()


def _shared_tables(l1: array[int]) -> frozenset[int]:
    """L2 tables more than one active L1 entry names (once at open, C-level loops)."""
    counts = Counter(map(OFFSET_MASK.__and__, l1))
    counts.pop(0, None)
    return frozenset(offset for offset, count in counts.items() if count > 1)


def _max_offset(words: array[int]) -> int:
    """An upper bound of the host offsets words name, below the next cluster for standard
    words (the low flag bits stay): the top byte (flags, reserved bits) cleared with one
    slice assignment, then one C-level max. About 12 ns a word."""
    raw = bytearray(words.tobytes())
    top = 7 if sys.byteorder == "little" else 0
    raw[top::8] = bytes(len(words))
    cleared = array("Q")
    cleared.frombytes(raw)
    return max(cleared)


def _past_end(l1: array[int], end: int) -> set[int]:
    """L2 tables active L1 entries name at or past `end` (one C-level max in the common
    case of none)."""
    if not l1 or max(map(OFFSET_MASK.__and__, l1)) < end:
        return set()
    return {entry & OFFSET_MASK for entry in l1 if entry & OFFSET_MASK >= end}


def _offsets(tables: Iterable[tuple[int, object]]) -> list[int]:
    return [offset for offset, _ in tables]


def _append(segments: list[Segment], segment: Segment) -> None:
    """Append, merging with the previous run when it continues it."""
    if segments:
        kind, position, count, host = segments[-1]
        # Compressed clusters are never merged: each inflates on its own.
        if (
            kind == segment[0] != KIND_COMPRESSED
            and position + count == segment[1]
            and (kind != KIND_DATA or host + count == segment[3])
        ):
            segments[-1] = (kind, position, count + segment[2], host)
            return
    segments.append(segment)


def _add_extent(extents: list[Extent], length: int, flags: int) -> None:
    if extents and extents[-1][1] == flags:
        extents[-1] = (extents[-1][0] + length, flags)
    else:
        extents.append((length, flags))
