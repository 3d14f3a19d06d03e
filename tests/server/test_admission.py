"""The slot table: per-client limits, re-keying under TLS, and which idle connection goes."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from nbdguard.server.access import ClientIdentity
from nbdguard.server.admission import (
    MAX_CONNECTIONS,
    MAX_PER_CLIENT,
    Admission,
    certificate_key,
    client_key,
    peer_uid,
)


class FakeHolder:
    """A connection idle since `since` (None: busy), recording its eviction."""

    def __init__(self, since: float | None = None) -> None:
        self.since = since
        self.evicted: float | None = None

    def idle_since(self) -> float | None:
        return self.since

    def evict(self, idle_seconds: float) -> None:
        assert self.evicted is None, "evicted twice"
        self.evicted = idle_seconds


def fill(table: Admission, client: str, count: int, since: float | None) -> list[FakeHolder]:
    holders = [FakeHolder(since) for _ in range(count)]
    for holder in holders:
        assert table.admit(holder, client, now=0.0) is None
    return holders


def test_a_client_beyond_its_limit_is_refused_and_others_are_not() -> None:
    table = Admission(max_connections=100, max_per_client=4, evict_idle_after=60)
    fill(table, "tcp 10.0.0.1", 4, since=0.0)
    assert table.admit(FakeHolder(), "tcp 10.0.0.1", now=0.0) == MAX_PER_CLIENT
    assert table.admit(FakeHolder(), "tcp 10.0.0.2", now=0.0) is None
    assert table.count("tcp 10.0.0.1") == 4 and len(table) == 5


def test_releasing_frees_the_clients_slot_once() -> None:
    table = Admission(max_connections=100, max_per_client=2, evict_idle_after=60)
    first, _ = fill(table, "uid 1000", 2, since=None)
    table.release(first)
    table.release(first)  # connection_lost after an eviction: no double count
    assert table.count("uid 1000") == 1
    assert table.admit(FakeHolder(), "uid 1000", now=0.0) is None
    assert table.admit(FakeHolder(), "uid 1000", now=0.0) == MAX_PER_CLIENT


def test_per_client_limit_is_not_lifted_by_eviction() -> None:
    table = Admission(max_connections=2, max_per_client=2, evict_idle_after=1)
    holders = fill(table, "uid 1000", 2, since=0.0)
    assert table.admit(FakeHolder(), "uid 1000", now=100.0) == MAX_PER_CLIENT
    assert all(holder.evicted is None for holder in holders)


def test_full_server_without_an_eligible_idle_connection_refuses() -> None:
    table = Admission(max_connections=3, max_per_client=10, evict_idle_after=5)
    busy = fill(table, "tcp 10.0.0.1", 2, since=None)  # requests in flight, or handshake
    recent = fill(table, "tcp 10.0.0.2", 1, since=8.0)  # idle 2 s only
    assert table.admit(FakeHolder(), "tcp 10.0.0.3", now=10.0) == MAX_CONNECTIONS
    assert all(holder.evicted is None for holder in busy + recent)
    assert len(table) == 3


def test_zero_evict_idle_after_never_evicts() -> None:
    table = Admission(max_connections=1, max_per_client=10, evict_idle_after=0)
    (old,) = fill(table, "tcp 10.0.0.1", 1, since=0.0)
    assert table.admit(FakeHolder(), "tcp 10.0.0.2", now=1e9) == MAX_CONNECTIONS
    assert old.evicted is None


def test_full_server_evicts_the_longest_idle_connection_of_the_biggest_client() -> None:
    table = Admission(max_connections=6, max_per_client=10, evict_idle_after=5)
    small = fill(table, "tcp 10.0.0.1", 1, since=0.0)  # idle longest, but a small client
    big = [FakeHolder(since) for since in (3.0, 1.0, None, 2.0)]
    for holder in big:
        assert table.admit(holder, "tcp 10.0.0.2", now=0.0) is None
    fill(table, "tcp 10.0.0.3", 1, since=0.0)
    newcomer = FakeHolder()
    assert table.admit(newcomer, "tcp 10.0.0.4", now=10.0) is None
    assert [holder.evicted for holder in big] == [None, 9.0, None, None]
    assert small[0].evicted is None
    assert table.count("tcp 10.0.0.2") == 3 and table.count("tcp 10.0.0.4") == 1
    assert len(table) == 6


def test_eviction_falls_back_to_a_smaller_client_when_the_biggest_is_busy() -> None:
    table = Admission(max_connections=3, max_per_client=10, evict_idle_after=5)
    fill(table, "tcp 10.0.0.1", 2, since=None)
    (idle,) = fill(table, "tcp 10.0.0.2", 1, since=0.0)
    assert table.admit(FakeHolder(), "tcp 10.0.0.3", now=5.0) is None  # exactly old enough
    assert idle.evicted == 5.0


def test_certificate_rekeys_the_connection_to_its_subject() -> None:
    table = Admission(max_connections=100, max_per_client=2, evict_idle_after=60)
    behind_nat = fill(table, "tcp 192.0.2.1", 2, since=None)
    assert table.rekey(behind_nat[0], "cert CN=web01") is None
    assert table.count("tcp 192.0.2.1") == 1 and table.count("cert CN=web01") == 1
    assert table.admit(FakeHolder(), "tcp 192.0.2.1", now=0.0) is None  # the address's slot
    assert table.rekey(behind_nat[0], "cert CN=web01") is None  # same key: unchanged
    assert table.count("cert CN=web01") == 1


def test_certificate_over_its_limit_is_refused_and_stays_counted_where_it_was() -> None:
    table = Admission(max_connections=100, max_per_client=2, evict_idle_after=60)
    for address in ("tcp 192.0.2.1", "tcp 192.0.2.2"):
        (holder,) = fill(table, address, 1, since=None)
        assert table.rekey(holder, "cert CN=web01") is None
    (third,) = fill(table, "tcp 192.0.2.3", 1, since=None)
    assert table.rekey(third, "cert CN=web01") == MAX_PER_CLIENT
    assert table.count("cert CN=web01") == 2 and table.count("tcp 192.0.2.3") == 1
    table.release(third)
    assert table.count("tcp 192.0.2.3") == 0 and len(table) == 2


def test_rekey_of_an_unknown_holder_does_nothing() -> None:
    table = Admission(max_connections=100, max_per_client=1, evict_idle_after=60)
    assert table.rekey(FakeHolder(), "cert CN=x") is None
    assert len(table) == 0 and table.count("cert CN=x") == 0


def test_limit_names_their_value() -> None:
    table = Admission(max_connections=7, max_per_client=3, evict_idle_after=60)
    assert table.limit(MAX_CONNECTIONS) == 7 and table.limit(MAX_PER_CLIENT) == 3


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "tcp 192.0.2.7"),
        ("::ffff:192.0.2.7", "tcp 192.0.2.7"),  # dual-stack listener: one client, one key
        ("2001:db8::1", "tcp 2001:db8::1"),
    ],
)
def test_tcp_clients_are_keyed_by_source_address(address: str, key: str) -> None:
    identity = ClientIdentity(ipaddress.ip_address(address))
    assert client_key(identity, sock=None) == key


def test_unix_clients_are_keyed_by_peer_uid() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_uid(left) == os.getuid()
        assert client_key(ClientIdentity(None), left) == f"uid {os.getuid()}"


def test_unix_peer_without_credentials_shares_one_key() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    left.close()
    right.close()
    assert peer_uid(left) is None  # closed: getsockopt fails
    assert client_key(ClientIdentity(None), None) == "unix"


def test_certificate_key_needs_a_verified_subject() -> None:
    identity = ClientIdentity(ipaddress.ip_address("192.0.2.7"))
    assert certificate_key(identity) is None
    identity.set_certificate(
        {"subject": ((("organizationName", "Example"),), (("commonName", "web01"),))}
    )
    assert certificate_key(identity) == "cert CN=web01,O=Example"  # RFC 4514
