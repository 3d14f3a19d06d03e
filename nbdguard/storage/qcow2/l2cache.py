"""A byte-bounded cache of a qcow2 layer's L2 tables.

Every cached table is in exactly one of three states, each kept in its own ordered dict or
set so no operation walks the tables of another state:

- clean: the file holds the same bytes; evictable, least recently used first;
- dirty: changed in memory since last written; never evicted, written back instead;
- pinned: captured by a write to the file that has not finished yet (a flush runs its I/O
  without the image lock); not evictable until it has, since reloading it from the file
  before then would read an older copy. A pinned table changed again is dirty as well.

Every operation is O(1) per table it touches; nothing is proportional to how many tables
are cached or dirty. The cache never grows past `limit` tables on its own: inserting into
a full cache evicts the least recently used clean table. What it cannot evict is the
caller's to write back: before a piece of work that may add `reserve` tables, at a point
where no table is in use, the caller writes back the `over(reserve)` dirty tables it asks
for (`take_dirty`, then `written`), so an insert always finds a clean table to drop.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable

MIN_TABLES = 8  # held whatever the budget: a request needs a few tables at once


class L2Cache:
    def __init__(self, budget: int, table_size: int, load: Callable[[int], array[int]]) -> None:
        self.table_size = table_size
        self.limit = max(MIN_TABLES, budget // table_size)  # tables
        self._load = load
        self._tables: dict[int, array[int]] = {}
        self._clean: OrderedDict[int, None] = OrderedDict()
        self._dirty: OrderedDict[int, None] = OrderedDict()
        self._pinned: set[int] = set()  # taken by a write that has not finished
        self._pinned_clean: set[int] = set()  # ... and not changed since
        self.peak = 0  # most tables ever cached at once
        self.evictions = 0

    # Sizes

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    @property
    def bytes(self) -> int:
        return len(self._tables) * self.table_size

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    @property
    def held(self) -> int:
        """Tables that cannot be evicted: dirty or pinned."""
        return len(self._dirty) + len(self._pinned_clean)

    def is_dirty(self, offset: int) -> bool:
        return offset in self._dirty

    # Lookup and insertion

    def get(self, offset: int) -> array[int]:
        """The table at `offset`, loaded (and inserted clean) on a miss."""
        table = self._tables.get(offset)
        if table is None:
            table = self._load(offset)
            self.insert(offset, table)
            return table
        if offset in self._clean:
            self._clean.move_to_end(offset)
        elif offset in self._dirty:
            self._dirty.move_to_end(offset)
        return table

    def insert(self, offset: int, table: array[int], *, dirty: bool = False) -> None:
        """Add a table (a new one is dirty); a full cache first drops its oldest clean table."""
        self.discard(offset)
        if len(self._tables) >= self.limit:
            self._evict_one()
        self._tables[offset] = table
        if dirty:
            self._dirty[offset] = None
        else:
            self._clean[offset] = None
        self.peak = max(self.peak, len(self._tables))

    def discard(self, offset: int) -> None:
        """Forget a table that no longer exists (its cluster is being freed)."""
        if self._tables.pop(offset, None) is not None:
            self._clean.pop(offset, None)
            self._dirty.pop(offset, None)
            self._pinned.discard(offset)
            self._pinned_clean.discard(offset)

    def mark_dirty(self, offset: int) -> None:
        """Before a cached table's entries change."""
        if offset not in self._tables:
            raise KeyError(f"L2 table {offset:#x} is not cached")
        if offset not in self._dirty:
            self._clean.pop(offset, None)
            self._pinned_clean.discard(offset)
            self._dirty[offset] = None

    # Room

    def over(self, reserve: int) -> int:
        """How many dirty tables must be written back so `reserve` tables can be added
        without exceeding the limit (0: evicting clean tables is enough)."""
        return max(0, self.held + reserve - self.limit)

    def evict(self, reserve: int) -> None:
        """Drop clean tables, oldest first, until `reserve` more fit (or none is left)."""
        while len(self._tables) + reserve > self.limit and self._clean:
            self._evict_one()

    def _evict_one(self) -> None:
        if self._clean:
            offset, _ = self._clean.popitem(last=False)
            del self._tables[offset]
            self.evictions += 1

    # Write-back

    def take_dirty(self, count: int | None = None) -> list[tuple[int, array[int]]]:
        """The `count` least recently used dirty tables (all if None), now pinned and no
        longer dirty, sorted by offset. The caller writes them, then calls `written`."""
        taken: list[int] = []
        while self._dirty and (count is None or len(taken) < count):
            offset, _ = self._dirty.popitem(last=False)
            self._pinned.add(offset)
            self._pinned_clean.add(offset)
            taken.append(offset)
        taken.sort()
        return [(offset, self._tables[offset]) for offset in taken]

    def written(self, offsets: Iterable[int], *, ok: bool) -> None:
        """A write of taken tables finished. Written tables not changed since are clean
        (the oldest: they were the least recently used dirty ones); after a failure they
        are dirty again."""
        for offset in offsets:
            if offset not in self._pinned:
                continue  # discarded meanwhile
            self._pinned.discard(offset)
            if offset not in self._pinned_clean:
                continue  # changed again: still dirty
            self._pinned_clean.discard(offset)
            if ok:
                self._clean[offset] = None
                self._clean.move_to_end(offset, last=False)
            else:
                self._dirty[offset] = None
                self._dirty.move_to_end(offset, last=False)
