"""No request holds the event loop for long: range operations run in slices that yield,
BLOCK_STATUS stops at a time budget, and the connection gives up its turn when a receive
brought more requests than one turn's budget serves. Sans sockets, against real images."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from nbdguard.protocol.constants import Command, CommandFlag, NBDError
from nbdguard.server import dispatch
from nbdguard.server.dispatch import SLICE_MIN, Slices, bounded_extents
from nbdguard.storage.device import BlockDevice, Extent, Layer, WouldBlock
from tests.protocol.nbdwire import request
from tests.server.test_dispatch import SIZE, image, make, serve  # noqa: F401 (fixture)


def test_slices_cover_the_range_exactly_on_slice_boundaries() -> None:
    calls: list[tuple[int, int]] = []
    offset, length = 12345, 9 * SLICE_MIN + 777
    work = Slices(lambda o, n: calls.append((o, n)), offset, length)
    while not work.done:
        assert work.run(1.0) is None
    assert calls[0][0] == offset and sum(n for _, n in calls) == length
    for (o, n), (next_o, _) in itertools.pairwise(calls):
        assert o + n == next_o and next_o % SLICE_MIN == 0  # contiguous, on boundaries


def test_slices_stop_at_the_budget_and_shrink_when_slow() -> None:
    calls: list[int] = []

    def slow(offset: int, length: int) -> None:
        calls.append(length)
        time.sleep(0.002)

    work = Slices(slow, 0, 1 << 30)
    work.run(0.004)
    assert not work.done and 1 <= len(calls) <= 3
    assert all(length == SLICE_MIN for length in calls)  # never grew: each was slow


def test_slices_grow_when_quick() -> None:
    calls: list[int] = []
    work = Slices(lambda o, n: calls.append(n), 0, 64 << 30)
    while not work.done:
        work.run(1.0)
    assert max(calls) == dispatch.SLICE_MAX and len(calls) < 100


def test_a_slice_that_would_block_is_handed_back_as_its_retry() -> None:
    done: list[tuple[int, int]] = []

    def operation(offset: int, length: int) -> None:
        if offset == 0:
            raise WouldBlock(lambda: done.append((offset, length)), "locked")
        done.append((offset, length))

    work = Slices(operation, 0, 3 * SLICE_MIN)
    retry = work.run(1.0)
    assert retry is not None and not done
    retry()
    while not work.done:
        assert work.run(1.0) is None
    assert done[0] == (0, SLICE_MIN) and sum(n for _, n in done) == 3 * SLICE_MIN


def test_bounded_extents_stops_at_the_time_budget_with_a_prefix() -> None:
    def status(offset: int, length: int, limit: int) -> list[Extent]:
        time.sleep(0.001)
        return [(512, offset // 512 % 2)]  # alternating flags: nothing merges

    extents = bounded_extents(status, 0, 1 << 30, 4096)
    assert 1 <= len(extents) <= 5  # STATUS_BUDGET is 2 ms: a few calls, not 4096
    assert [flags for _, flags in extents] == [i % 2 for i in range(len(extents))]


def test_bounded_extents_merges_across_calls_and_respects_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The time budget is another way to stop early; a preempted CI runner once hit it
    # after the first call (256 extents, not 1000). This test is about merging and limit.
    monkeypatch.setattr(dispatch, "STATUS_BUDGET", 60.0)

    def status(offset: int, length: int, limit: int) -> list[Extent]:
        return [(min(4096, length), 0)][:limit]

    assert bounded_extents(status, 0, 1 << 20, 4096) == [(1 << 20, 0)]

    def alternating(offset: int, length: int, limit: int) -> list[Extent]:
        return [(512, (offset // 512 + i) % 2) for i in range(limit)]

    extents = bounded_extents(alternating, 0, 1 << 30, 1000)
    assert len(extents) == 1000


def test_bounded_extents_ends_when_the_device_makes_no_progress() -> None:
    assert bounded_extents(lambda o, n, m: [], 0, 4096, 10) == []


class SlowTrim(Layer):
    """Each trim call costs 1 ms: a large TRIM would hold the loop for seconds if done whole."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.trimmed: list[tuple[int, int]] = []

    def trim(self, offset: int, length: int) -> None:
        time.sleep(0.001)
        self.trimmed.append((offset, length))
        self.inner.trim(offset, length)


async def test_a_long_trim_yields_to_the_loop_and_replies_when_done(
    image: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slice_size = 64 << 10  # 64 slices of 1 ms each, every one the same size
    monkeypatch.setattr(dispatch, "SLICE_MIN", slice_size)
    monkeypatch.setattr(dispatch, "SLICE_MAX", slice_size)
    dispatcher, wire, export = make(image, structured=False)
    slow = SlowTrim(dispatcher.device)
    dispatcher.device = slow
    serve(dispatcher, request(Command.TRIM, 0, SIZE, cookie=5, flags=CommandFlag.FUA))
    assert not wire.data and 1 <= len(slow.trimmed) <= 8  # one turn's worth inline
    ticks = 0
    while dispatcher.tasks:
        await asyncio.sleep(0)
        ticks += 1
    assert ticks >= 1  # the loop ran other work between turns
    assert wire.simple()[:2] == (NBDError.OK, 5)
    assert sum(n for _, n in slow.trimmed) == SIZE
    export.close()


async def test_a_blocked_first_slice_waits_off_the_loop_then_the_rest_is_done(
    image: Path,  # noqa: F811
) -> None:
    dispatcher, wire, export = make(image, structured=False)
    calls: list[Any] = []

    class Locked(Layer):
        def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
            if offset == 0:

                def retry() -> None:
                    calls.append(("retry", offset, length))
                    self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast)

                raise WouldBlock(retry, "sector 0 locked")
            calls.append(("inline", offset, length))
            self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast)

    with open(image, "r+b") as handle:
        handle.write(b"\x11" * SIZE)
    dispatcher.device = Locked(dispatcher.device)
    serve(dispatcher, request(Command.WRITE_ZEROES, 0, SIZE, cookie=6))
    assert not wire.data  # the reply waits for the retry
    await dispatcher.drain()
    assert wire.simple()[:2] == (NBDError.OK, 6)
    assert calls[0] == ("retry", 0, SLICE_MIN)
    assert sum(call[2] for call in calls) == SIZE
    assert image.read_bytes() == bytes(SIZE)
    export.close()


async def test_cache_of_the_whole_export_replies_ok(image: Path) -> None:  # noqa: F811
    """On a loaded machine the cache may take more than one turn and finish in a task:
    the replies are then in either order (NBD matches them by cookie)."""
    dispatcher, wire, export = make(image, structured=False)
    serve(dispatcher, request(Command.CACHE, 0, SIZE, cookie=7))
    serve(dispatcher, request(Command.TRIM, 0, 0, cookie=8))
    await dispatcher.drain()
    replies = sorted(wire.simple()[:2] for _ in range(2))
    assert replies == [(NBDError.OK, 7), (NBDError.OK, 8)]
    export.close()
