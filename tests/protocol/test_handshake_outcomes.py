"""How a handshake that ends in NBD_OPT_ABORT is classified: asking what the server has
and leaving is normal use (`nbdinfo --list`), so it must not look like a failure."""

from __future__ import annotations

import struct

import pytest

from nbdguard.observability.metrics import CLEAN_HANDSHAKE_ENDS, Metrics
from nbdguard.protocol.constants import Info, Option
from nbdguard.protocol.handshake import CLEAN_CODES, Handshake, HandshakeClosed
from tests.protocol.conftest import Directory
from tests.protocol.nbdwire import info_payload, meta_payload, option


def aborted_after(directory: Directory, *options: bytes) -> HandshakeClosed:
    hs = Handshake(directory)
    hs.data_to_send()
    assert hs.receive(struct.pack(">I", 3)) is None
    for sent in options:
        assert hs.receive(sent) is None
    event = hs.receive(option(Option.ABORT))
    assert isinstance(event, HandshakeClosed)
    return event


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ((), "aborted"),
        ((option(Option.LIST),), "list"),
        ((option(Option.INFO, info_payload("vm1", Info.NAME)),), "info"),
        ((option(Option.INFO, info_payload("vm1")), option(Option.LIST)), "list"),
        ((option(Option.LIST), option(Option.INFO, info_payload("vm1"))), "list"),
        (
            (
                option(Option.STRUCTURED_REPLY),
                option(Option.LIST_META_CONTEXT, meta_payload("vm1")),
            ),
            "info",
        ),
        # a refused INFO answered nothing: the session only aborted
        ((option(Option.INFO, info_payload("missing")),), "aborted"),
        ((option(Option.LIST, b"junk"),), "aborted"),
    ],
)
def test_abort_code_says_what_was_asked(
    directory: Directory, options: tuple[bytes, ...], code: str
) -> None:
    event = aborted_after(directory, *options)
    assert event.clean and event.code == code
    assert event.code in CLEAN_CODES


def test_metrics_count_clean_ends_as_outcomes_and_the_rest_as_failures() -> None:
    assert set(CLEAN_CODES) == set(CLEAN_HANDSHAKE_ENDS)
    metrics = Metrics()
    for code in ("list", "list", "info", "aborted", "bad_option_magic", "disconnected"):
        metrics.handshake_ended(code)
    metrics.for_export("vm1").connection_opened()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    outcomes = {"transmission": 1, "list": 2, "info": 1, "aborted": 1, "failed": 2}
    for outcome, count in outcomes.items():
        assert value("nbdguard_handshakes_total", outcome=outcome) == count, outcome
    assert value("nbdguard_handshake_failures_total", reason="bad_option_magic") == 1
    assert value("nbdguard_handshake_failures_total", reason="disconnected") == 1
    for code in CLEAN_HANDSHAKE_ENDS:  # never a failure reason
        assert value("nbdguard_handshake_failures_total", reason=code) is None
    assert value("nbdguard_handshake_failures_total", reason="unknown_export") == 0
