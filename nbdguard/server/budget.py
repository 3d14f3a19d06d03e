"""Bytes the server holds for its clients, per connection and all together.

A connection holds reply data read into memory and not yet sent, and payload bytes it has
copied and not yet written. Each connection reports what it holds at the points where that
changes in bulk (after serving a batch, when output drains, when a write completes), and
asks `over()` whether it may read more requests. A connection past its own limit, or past
its fair share while all of them together are past the server's budget, stops being read
until what it holds drains: back-pressure, never an error. Reading stops, so the client's
own socket buffer fills and it stops sending; nothing is dropped.

Fairness: a connection may hold what the others leave of the server's budget, and at least
a floor (the budget divided by max_connections), so a connection holding little is never
throttled because another holds much, and all of them together stay within the budget plus
one floor each. Each connection checks its allowance once per batch of requests and stops
the batch when it reaches it (so the bound is exceeded by at most one reply each). A WRITE
that must be gathered whole (it touches sector 0 under the guard) cannot finish unless its
connection keeps reading; it is exempt while it is the only such write over the budget, so
one is always able to complete (the bound is then budget + one max payload).
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter

FLOOR_MIN = 64 * 1024  # the least a connection may always hold: a request's worth


class Holder:
    """One connection's account: what it holds and when it was throttled."""

    __slots__ = ("held", "resume", "throttled_since")

    def __init__(self, resume: Callable[[], None]) -> None:
        self.held = 0
        self.resume = resume  # called (from update) when this holder may read again
        self.throttled_since: float | None = None


class MemoryBudget:
    """The server-wide budget (`memory_budget`) and each connection's limit
    (`max_buffered_bytes_per_connection`)."""

    def __init__(self, total: int, per_connection: int, max_connections: int = 100) -> None:
        self.total = total
        self.per_connection = per_connection
        self.floor = min(per_connection, max(total // max(max_connections, 1), FLOOR_MIN))
        self.used = 0
        self._throttled: set[Holder] = set()
        self._gathering: Holder | None = None  # the one holder exempt while gathering a write

    def open(self, resume: Callable[[], None]) -> Holder:
        return Holder(resume)

    def close(self, holder: Holder) -> float:
        """Forget a connection; returns the seconds it was throttled and not yet reported."""
        seconds = self.unthrottled(holder)
        if self._gathering is holder:
            self._gathering = None
            self._wake(everyone=True)
        self.update(holder, 0)
        return seconds

    def update(self, holder: Holder, held: int) -> None:
        """Record what `holder` holds now; wake throttled holders if room was made."""
        before = holder.held
        if held == before:
            return
        holder.held = held
        self.used += held - before
        if held < before and self._throttled:
            self._wake(everyone=self.used <= self.total)

    def over(self, holder: Holder, *, gathering: bool = False) -> bool:
        """Whether `holder` must stop reading; if so it is throttled until its `resume` is
        called, and must then ask again. `gathering`: it is in the middle of a write that
        must be whole (see the module docstring)."""
        if self._gathering is holder and not gathering:
            self._gathering = None  # the exemption is free: another gathering write may go
            self._wake(everyone=True)
        if self._within(holder):
            return False
        if gathering and self._gathering in (None, holder):
            self._gathering = holder
            return False
        if holder.throttled_since is None:
            holder.throttled_since = perf_counter()
            self._throttled.add(holder)
        return True

    def unthrottled(self, holder: Holder) -> float:
        """`holder` reads again: returns the seconds it was throttled."""
        since = holder.throttled_since
        if since is None:
            return 0.0
        holder.throttled_since = None
        self._throttled.discard(holder)
        return perf_counter() - since

    def allowance(self, holder: Holder) -> int:
        """The bytes `holder` may hold now: what the others leave of the budget, at least
        the floor, at most the per-connection limit."""
        room = self.total - (self.used - holder.held)
        return min(self.per_connection, max(room, self.floor))

    def _within(self, holder: Holder) -> bool:
        return holder.held <= self.allowance(holder)

    def _wake(self, *, everyone: bool) -> None:
        """Let throttled holders ask again: all of them, or those now within bounds."""
        for holder in list(self._throttled):
            if everyone or self._within(holder):
                holder.resume()
