"""Rate limits for log lines that a client can cause once per request.

A client that writes a qcow2 header into sector 0 in a loop gets every write refused, and
each refusal is worth a `guard.header_write_blocked` line: unlimited, that is megabytes of
log per second from one connection. `LogRateLimiter` is a structlog processor that lets a
burst of such lines through per source (a connection, or a client and export when no
connection is named) and per event name, then refills at `burst` lines per `interval`
seconds (a token bucket); the rest are dropped and counted. The count comes back as one
`log.suppressed` event (with `suppressed_event`, `count`, `export`, `client`, `conn`):

- before the next line of that source and event that is let through, at most once per
  `interval`;
- from a sweep, run at most once per `interval` when any line is logged, for sources whose
  flood has stopped;
- before the connection's `connection.closed` line (the source is then forgotten), and for
  every source before `server.stopped` (or on `flush()`);
- when the source is evicted: at most `max_sources` sources are remembered (least recently
  used first out), so a client cycling connections cannot grow the limiter without end.

Metrics are not touched: they count every event whether its line was dropped or not.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import structlog

SUPPRESSED_EVENT = "log.suppressed"

# Events a client can cause once per request (or once per connection, many connections).
DEFAULT_LIMITED_EVENTS = frozenset(
    {
        "guard.header_write_blocked",
        "guard.sector_lock_timeout",
        "request.failed",
        "qcow2.corrupt",
        "connection.send_failed",
        "protocol.violation",
    }
)

# The line before which a connection's summaries are flushed and its source forgotten.
CLOSE_EVENT = "connection.closed"
# The line before which every summary is flushed.
STOPPED_EVENT = "server.stopped"

DEFAULT_BURST = 20
DEFAULT_INTERVAL = 10.0
DEFAULT_MAX_SOURCES = 1024

Summary = dict[str, Any]
Emit = Callable[[str, Summary], None]  # (level method, e.g. "warning"; summary fields)
Source = tuple[object, ...]
_Pending = tuple[str, Summary]


class _Bucket:
    """One (source, event): tokens left, lines dropped since the last summary."""

    __slots__ = ("dropped", "fields", "last_summary", "level", "stamp", "tokens")

    def __init__(self, tokens: float, now: float, level: str, fields: dict[str, Any]) -> None:
        self.level = level
        self.tokens = tokens
        self.stamp = now
        self.dropped = 0
        self.last_summary = float("-inf")
        self.fields = fields


class LogRateLimiter:
    """A structlog processor: at most `burst` lines per `interval` seconds per source and
    event name for the events in `events`; see the module docstring.

    `emit` is called (outside the limiter's lock) with the level of the suppressed lines
    and the fields of each `log.suppressed` summary; the logging configuration logs it
    through structlog, tests collect it. `clock` is a monotonic clock in seconds."""

    def __init__(
        self,
        emit: Emit,
        *,
        burst: int = DEFAULT_BURST,
        interval: float = DEFAULT_INTERVAL,
        max_sources: int = DEFAULT_MAX_SOURCES,
        events: Iterable[str] = DEFAULT_LIMITED_EVENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or interval <= 0 or max_sources < 1:
            raise ValueError("burst and max_sources must be >= 1, interval > 0")
        self.emit = emit
        self.burst = burst
        self.interval = interval
        self.max_sources = max_sources
        self.events = frozenset(events)
        self.clock = clock
        self._rate = burst / interval  # tokens per second
        self._sources: OrderedDict[Source, dict[str, _Bucket]] = OrderedDict()
        self._lock = threading.Lock()
        self._next_sweep = clock() + interval

    # -- the processor ------------------------------------------------------------------

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        if event == SUPPRESSED_EVENT:
            return event_dict  # our own summaries are never limited (nor re-enter)
        limited = event in self.events
        closing = event in (CLOSE_EVENT, STOPPED_EVENT)
        now = self.clock()
        if not limited and not closing and now < self._next_sweep:
            return event_dict  # the common case: one dict lookup, one clock read
        summaries: list[_Pending] = []
        drop = False
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now, summaries)
            if event == STOPPED_EVENT:
                self._forget_all(summaries)
            elif closing:
                self._forget(_source_of(event_dict), summaries)
            elif limited:
                drop = not self._admit(str(event), method_name, event_dict, now, summaries)
        for level, summary in summaries:
            self.emit(level, summary)
        if drop:
            raise structlog.DropEvent
        return event_dict

    def flush(self) -> None:
        """Emit the summary of every source with dropped lines, and forget all sources."""
        summaries: list[_Pending] = []
        with self._lock:
            self._forget_all(summaries)
        for level, summary in summaries:
            self.emit(level, summary)

    @property
    def sources(self) -> int:
        """How many sources are remembered (bounded by `max_sources`)."""
        return len(self._sources)

    # -- under the lock -----------------------------------------------------------------

    def _admit(
        self,
        event: str,
        level: str,
        event_dict: MutableMapping[str, Any],
        now: float,
        out: list[_Pending],
    ) -> bool:
        source = _source_of(event_dict)
        buckets = self._sources.get(source)
        if buckets is None:
            buckets = self._sources[source] = {}
            while len(self._sources) > self.max_sources:
                _, evicted = self._sources.popitem(last=False)
                _collect(evicted, out)
        else:
            self._sources.move_to_end(source)
        bucket = buckets.get(event)
        if bucket is None:
            fields = {
                "suppressed_event": event,
                "export": event_dict.get("export"),
                "client": event_dict.get("client"),
                "conn": event_dict.get("conn"),
            }
            bucket = buckets[event] = _Bucket(float(self.burst), now, level, fields)
        else:
            elapsed = now - bucket.stamp
            if elapsed > 0:
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self._rate)
                bucket.stamp = now
        if bucket.tokens < 1.0:
            bucket.dropped += 1
            return False
        bucket.tokens -= 1.0
        if bucket.dropped and now - bucket.last_summary >= self.interval:
            out.append(self._summary(bucket, now))
        return True

    def _summary(self, bucket: _Bucket, now: float) -> _Pending:
        summary = {**bucket.fields, "count": bucket.dropped}
        bucket.dropped = 0
        bucket.last_summary = now
        return bucket.level, summary

    def _sweep(self, now: float, out: list[_Pending]) -> None:
        """Summaries for floods that stopped; forget sources whose buckets are full again."""
        self._next_sweep = now + self.interval
        idle: list[Source] = []
        for source, buckets in self._sources.items():
            quiet = True
            for bucket in buckets.values():
                if bucket.dropped and now - bucket.last_summary >= self.interval:
                    out.append(self._summary(bucket, now))
                full = bucket.tokens + (now - bucket.stamp) * self._rate >= self.burst
                if bucket.dropped or not full:
                    quiet = False
            if quiet:
                idle.append(source)
        for source in idle:
            del self._sources[source]

    def _forget_all(self, out: list[_Pending]) -> None:
        for buckets in self._sources.values():
            _collect(buckets, out)
        self._sources.clear()

    def _forget(self, source: Source, out: list[_Pending]) -> None:
        buckets = self._sources.pop(source, None)
        if buckets is not None:
            _collect(buckets, out)


def _source_of(event_dict: MutableMapping[str, Any]) -> Source:
    """A connection when the line names one (its id is unique in the process), else the
    client and export."""
    conn = event_dict.get("conn")
    if conn is not None:
        return ("conn", conn)
    return ("client", event_dict.get("client"), event_dict.get("export"))


def _collect(buckets: dict[str, _Bucket], out: list[_Pending]) -> None:
    for bucket in buckets.values():
        if bucket.dropped:
            out.append((bucket.level, {**bucket.fields, "count": bucket.dropped}))
            bucket.dropped = 0
