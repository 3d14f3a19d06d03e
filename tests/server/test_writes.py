"""A WRITE's payload, piece by piece: parts on the device's unit as they arrive, whole
where it must be whole, a failure remembered, and never more held than necessary."""

from __future__ import annotations

import itertools
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdguard.protocol.constants import Command, NBDError
from nbdguard.protocol.transmission import Request
from nbdguard.server.writes import PART_WRITE_MIN, IncomingWrite


class Recorder:
    """A device that records each pwrite (its offset and bytes) into a bytearray image."""

    def __init__(self, size: int, fail_at: int | None = None) -> None:
        self.image = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.fail_at = fail_at  # the call index that raises ENOSPC

    def pwrite(self, data: Any, offset: int) -> None:
        if self.fail_at is not None and len(self.writes) == self.fail_at:
            raise OSError(28, "No space left on device")
        view = memoryview(data).cast("B")
        self.image[offset : offset + len(view)] = view
        self.writes.append((offset, len(view)))


def feed(
    device: Recorder, offset: int, payload: bytes, cuts: list[int], unit: int
) -> IncomingWrite:
    """Give a write its payload in pieces cut at `cuts`; the last piece goes through rest()."""
    incoming = IncomingWrite(
        Request(0, Command.WRITE, 1, offset, len(payload)), 0.0, NBDError.OK, unit
    )
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(payload))), len(payload)]
    for start, stop in itertools.pairwise(bounds[:-1]):
        incoming.add(device, memoryview(payload)[start:stop])  # type: ignore[arg-type]
        assert incoming.held < PART_WRITE_MIN + 2 * max(unit, 1) or not unit
    rest = incoming.rest(memoryview(payload)[bounds[-2] :])
    if len(rest):
        device.pwrite(rest, offset + incoming.written)
    return incoming


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 5 * 4096),
    st.integers(1, 600_000),
    st.lists(st.integers(1, 600_000), max_size=12),
    st.sampled_from([512, 4096, 65536]),
)
def test_parts_end_on_the_unit_and_make_the_whole(
    offset: int, length: int, cuts: list[int], unit: int
) -> None:
    payload = os.urandom(length)
    device = Recorder(offset + length + unit)
    feed(device, offset, payload, cuts, unit)
    assert device.image[offset : offset + length] == payload
    position = offset
    for index, (at, size) in enumerate(device.writes):
        assert at == position  # in order, no gaps, no overlaps
        position += size
        if index < len(device.writes) - 1:
            assert (at + size) % unit == 0  # every part but the last ends on the unit
    assert position == offset + length


def test_a_write_that_must_be_whole_is_written_once_at_the_end() -> None:
    payload = os.urandom(300_000)
    device = Recorder(1 << 20)
    incoming = feed(device, 0, payload, [1000, 70_000, 200_000], unit=0)
    assert device.writes == [(0, len(payload))]
    assert incoming.written == 0 and device.image[: len(payload)] == payload


def test_gathered_bytes_are_held_and_counted_as_they_arrive() -> None:
    """Memory follows what arrived, not what the header announced."""
    request = Request(0, Command.WRITE, 1, 0, 32 << 20)
    incoming = IncomingWrite(request, 0.0, NBDError.OK, 0)
    assert incoming.held == 0
    incoming.add(Recorder(0), memoryview(bytes(1000)))  # type: ignore[arg-type]
    assert incoming.held == 1000


def test_a_single_whole_piece_is_written_from_the_receive_buffer_not_copied() -> None:
    payload = bytearray(os.urandom(4096))
    incoming = IncomingWrite(Request(0, Command.WRITE, 1, 0, 4096), 0.0, NBDError.OK, 0)
    view = memoryview(payload)
    assert incoming.rest(view) is view


def test_a_failed_part_fails_the_write_and_nothing_more_is_written() -> None:
    payload = os.urandom(400_000)
    device = Recorder(1 << 20, fail_at=1)
    request = Request(0, Command.WRITE, 1, 0, len(payload))
    incoming = IncomingWrite(request, 0.0, NBDError.OK, 4096)
    for start in range(0, 300_000, 100_000):
        incoming.add(device, memoryview(payload)[start : start + 100_000])  # type: ignore[arg-type]
    assert len(device.writes) == 1 and incoming.held == 0
    try:
        incoming.rest(memoryview(payload)[300_000:])
    except OSError as err:
        assert err.errno == 28
    else:
        raise AssertionError("the failure must come out at the end")
    assert len(device.writes) == 1


def test_a_refused_write_drops_its_payload() -> None:
    request = Request(0, Command.WRITE, 1, 0, 1 << 20)
    incoming = IncomingWrite(request, 0.0, NBDError.EINVAL, 0)
    device = Recorder(1 << 20)
    incoming.add(device, memoryview(bytes(500_000)))  # type: ignore[arg-type]
    assert incoming.held == 0 and not device.writes
