"""Who may hold a connection slot.

Two limits bound the slots: `max_connections` in all and `max_connections_per_client` for
one client, idle connections included, so that one client cannot lock the others out. A
client is the TCP source address, the peer uid of a Unix socket, or, under TLS once the
handshake has shown a verified certificate, its subject (the connection is re-keyed then).

At `max_connections` a new connection may take the slot of an idle one: among the
connections in transmission with nothing in flight that sent no request for at least
`evict_idle_after` seconds, one of the client holding the most connections, and of its
connections the one idle longest. With none eligible (or `evict_idle_after = 0`) the new
connection is refused. Beyond its own limit a client is refused, with no eviction.

The table is pure bookkeeping: holders say whether and since when they are idle, and are
told to go; the clock is passed in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections import Counter
from typing import Any, Protocol

from nbdguard.server.access import ClientIdentity

ClientKey = str  # "tcp 192.0.2.7", "uid 1000", "cert CN=web01": also what the log shows
MAX_CONNECTIONS = "max_connections"
MAX_PER_CLIENT = "max_connections_per_client"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Holder(Protocol):
    """A connection as admission sees it."""

    def idle_since(self) -> float | None:
        """When its last request arrived, if it is idle in transmission; None when it is
        in the handshake, has anything in flight, or is closing."""

    def evict(self, idle_seconds: float) -> None:
        """Close now to give up the slot (only called while idle_since() is not None)."""


class Admission:
    """The slot table: every admitted connection and the client it belongs to."""

    def __init__(self, max_connections: int, max_per_client: int, evict_idle_after: float):
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.evict_idle_after = evict_idle_after
        self._clients: dict[Holder, ClientKey] = {}
        self._counts: Counter[ClientKey] = Counter()

    def __len__(self) -> int:
        return len(self._clients)

    def count(self, client: ClientKey) -> int:
        return self._counts[client]

    def limit(self, name: str) -> int:
        """The configured value of a limit admit() or rekey() named."""
        return self.max_connections if name == MAX_CONNECTIONS else self.max_per_client

    def admit(self, holder: Holder, client: ClientKey, now: float) -> str | None:
        """Give `holder` a slot (evicting an idle connection if the server is full), or
        return the name of the limit that refuses it."""
        if self._counts[client] >= self.max_per_client:
            return MAX_PER_CLIENT
        if len(self._clients) >= self.max_connections:
            victim = self._pick_idle(now)
            if victim is None:
                return MAX_CONNECTIONS
            idle_since = victim.idle_since()
            assert idle_since is not None
            self.release(victim)
            victim.evict(now - idle_since)
        self._clients[holder] = client
        self._counts[client] += 1
        return None

    def rekey(self, holder: Holder, client: ClientKey) -> str | None:
        """The holder turned out to be `client` (a certificate was shown): count it there,
        or return the limit that refuses it (it then stays counted where it was)."""
        old = self._clients.get(holder)
        if old is None or old == client:
            return None
        if self._counts[client] >= self.max_per_client:
            return MAX_PER_CLIENT
        self._forget(holder, old)
        self._clients[holder] = client
        self._counts[client] += 1
        return None

    def release(self, holder: Holder) -> None:
        """The holder's connection ended (or was evicted): free its slot. Idempotent."""
        old = self._clients.get(holder)
        if old is not None:
            self._forget(holder, old)

    def _forget(self, holder: Holder, client: ClientKey) -> None:
        del self._clients[holder]
        self._counts[client] -= 1
        if not self._counts[client]:
            del self._counts[client]

    def _pick_idle(self, now: float) -> Holder | None:
        """The eviction rule (module docstring): most connections first, then idle longest."""
        if self.evict_idle_after <= 0:
            return None
        best: Holder | None = None
        best_rank: tuple[int, float] | None = None
        for holder, client in self._clients.items():
            since = holder.idle_since()
            if since is None or now - since < self.evict_idle_after:
                continue
            rank = (-self._counts[client], since)
            if best_rank is None or rank < best_rank:
                best, best_rank = holder, rank
        return best


def client_key(identity: ClientIdentity, sock: Any) -> ClientKey:
    """Who a new connection belongs to before any certificate: its TCP source address (an
    IPv4-mapped IPv6 address counts as the IPv4 one), else its Unix peer's uid."""
    address = identity.address
    if address is not None:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return f"tcp {address}"
    uid = peer_uid(sock)
    return f"uid {uid}" if uid is not None else "unix"


def certificate_key(identity: ClientIdentity) -> ClientKey | None:
    """Who the connection belongs to once TLS showed a verified certificate (None: none)."""
    return f"cert {identity.describe()}" if identity.subject else None


def peer_uid(sock: Any) -> int | None:
    """The uid of a Unix-socket peer (SO_PEERCRED), or None if it cannot be known."""
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    with contextlib.suppress(OSError, AttributeError):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        return int(_PEERCRED.unpack(raw)[1])
    return None
