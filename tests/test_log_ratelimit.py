"""The log rate limiter: a burst per (connection, event), then drops, counted in
`log.suppressed` summaries; bounded memory; installed by configure_logging."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from nbdguard.observability.logging import configure_logging, get_logger
from nbdguard.observability.ratelimit import LogRateLimiter

BLOCKED = "guard.header_write_blocked"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A limiter with a fake clock; records what passed and the summaries, in order."""

    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.out: list[tuple[str, dict[str, Any]]] = []
        kwargs.setdefault("burst", 5)
        kwargs.setdefault("interval", 10.0)
        self.limiter = LogRateLimiter(self._summary, clock=self.clock, **kwargs)

    def _summary(self, level: str, fields: dict[str, Any]) -> None:
        self.out.append(("summary:" + level, fields))

    def log(self, event: str, level: str = "warning", **fields: Any) -> bool:
        """True when the line passed."""
        line = {"event": event, **fields}
        try:
            self.limiter(None, level, line)
        except structlog.DropEvent:
            return False
        self.out.append((event, line))
        return True

    def summaries(self) -> list[dict[str, Any]]:
        return [fields for kind, fields in self.out if kind.startswith("summary:")]


def conn(n: int, export: str = "vm1") -> dict[str, Any]:
    return {"conn": n, "client": f"127.0.0.1:{40000 + n}", "export": export}


def test_a_burst_passes_then_lines_are_dropped() -> None:
    h = Harness()
    passed = [h.log(BLOCKED, **conn(1)) for _ in range(100)]
    assert passed == [True] * 5 + [False] * 95
    assert h.summaries() == []  # nothing passed since the drops began


def test_the_next_line_let_through_is_preceded_by_a_summary() -> None:
    h = Harness()
    for _ in range(100):
        h.log(BLOCKED, **conn(1))
    h.clock.now += 2.0  # refills one token (5 per 10 s)
    assert h.log(BLOCKED, **conn(1), offset=0)
    kind, summary = h.out[-2]
    assert kind == "summary:warning"
    assert summary == {
        "suppressed_event": BLOCKED,
        "count": 95,
        "export": "vm1",
        "client": "127.0.0.1:40001",
        "conn": 1,
    }
    assert h.out[-1][0] == BLOCKED


def test_summaries_come_at_most_once_per_interval() -> None:
    h = Harness()
    # A sustained flood of 100 lines/s for 60 s: about 5 lines per 10 s pass.
    for _ in range(6000):
        h.clock.now += 0.01
        h.log(BLOCKED, **conn(1))
    passed = sum(1 for kind, _ in h.out if kind == BLOCKED)
    assert passed <= 5 + 6 * 5 + 1
    summaries = h.summaries()
    assert 5 <= len(summaries) <= 7
    h.limiter.flush()
    counted = sum(s["count"] for s in h.summaries())
    assert counted + passed == 6000  # every line either passed or is counted


def test_sources_and_events_are_limited_separately() -> None:
    h = Harness()
    for _ in range(20):
        h.log(BLOCKED, **conn(1))
    assert h.log(BLOCKED, **conn(2))  # another connection
    assert h.log("request.failed", **conn(1))  # another event
    for _ in range(20):
        assert h.log("connection.ready", level="info", **conn(1))  # not a limited event


def test_lines_without_a_connection_are_limited_per_client_and_export() -> None:
    h = Harness()
    for _ in range(5):
        assert h.log("guard.sector_lock_timeout", client="c", export="a")
    assert not h.log("guard.sector_lock_timeout", client="c", export="a")
    assert h.log("guard.sector_lock_timeout", client="c", export="b")
    assert h.log("guard.sector_lock_timeout", client="d", export="a")


def test_connection_closed_flushes_that_connection_and_forgets_it() -> None:
    h = Harness()
    for n in (1, 2):
        for _ in range(12):
            h.log(BLOCKED, **conn(n))
    assert h.limiter.sources == 2
    assert h.log("connection.closed", level="info", **conn(1))
    assert h.out[-2] == (
        "summary:warning",
        {
            "suppressed_event": BLOCKED,
            "count": 7,
            "export": "vm1",
            "client": "127.0.0.1:40001",
            "conn": 1,
        },
    )
    assert h.limiter.sources == 1
    assert h.log("server.stopped", level="info")
    assert [s["conn"] for s in h.summaries()] == [1, 2]
    assert h.limiter.sources == 0


def test_a_stopped_flood_is_summarised_by_the_sweep() -> None:
    h = Harness()
    for _ in range(8):
        h.log(BLOCKED, **conn(1))
    h.clock.now += 11.0
    assert h.log("export.flushed", level="info")  # any line runs the sweep, once per interval
    assert [s["count"] for s in h.summaries()] == [3]
    h.clock.now += 11.0  # the bucket is full again: the source is forgotten
    h.log("export.flushed", level="info")
    assert h.limiter.sources == 0
    assert len(h.summaries()) == 1


def test_memory_is_bounded_and_evicted_drops_are_not_lost() -> None:
    h = Harness(max_sources=16)
    for n in range(1000):  # a client cycling connections, never closing them cleanly
        for _ in range(7):
            h.log(BLOCKED, **conn(n))
        assert h.limiter.sources <= 16
    summaries = h.summaries()
    assert len(summaries) == 1000 - 16
    assert all(s["count"] == 2 for s in summaries)
    h.limiter.flush()
    assert len(h.summaries()) == 1000
    assert h.limiter.sources == 0


def test_summary_level_follows_the_suppressed_lines() -> None:
    h = Harness(burst=1)
    h.log("qcow2.corrupt", level="error", **conn(1))
    h.log("qcow2.corrupt", level="error", **conn(1))
    h.limiter.flush()
    assert h.out[-1][0] == "summary:error"


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        LogRateLimiter(lambda level, fields: None, burst=0)
    with pytest.raises(ValueError):
        LogRateLimiter(lambda level, fields: None, interval=0)


@pytest.fixture
def configured() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_configure_logging_installs_the_limiter(
    capsys: pytest.CaptureFixture[str], configured: None
) -> None:
    clock = Clock()
    from nbdguard.observability.logging import _log_summary

    limiter = LogRateLimiter(_log_summary, burst=3, interval=10.0, clock=clock)
    assert configure_logging("json", "info", limiter=limiter) is limiter
    log = get_logger(export="vm1").bind(conn=4, client="unix:uid=1000")
    for offset in range(50):
        log.warning(BLOCKED, offset=offset)
    clock.now += 4.0  # one token back
    log.warning(BLOCKED, offset=99)
    log.info("connection.closed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    events = [line["event"] for line in lines]
    assert events == [BLOCKED] * 3 + ["log.suppressed", BLOCKED, "connection.closed"]
    summary = lines[3]
    assert summary["suppressed_event"] == BLOCKED
    assert summary["count"] == 47
    assert summary["level"] == "warning"
    assert (summary["export"], summary["conn"], summary["client"]) == ("vm1", 4, "unix:uid=1000")
    assert "timestamp" in summary
    assert lines[4]["offset"] == 99


def test_configure_logging_has_a_limiter_by_default(
    capsys: pytest.CaptureFixture[str], configured: None
) -> None:
    limiter = configure_logging("json", "info")
    log = get_logger(export="vm1").bind(conn=5, client="x")
    for _ in range(500):
        log.warning("request.failed", error="EIO")
    limiter.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) < 50
    assert lines[-1]["event"] == "log.suppressed"
    assert lines[-1]["count"] + len(lines) - 1 == 500
