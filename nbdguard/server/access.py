"""Who may see and use which export: the per-connection view of the export registry.

An export with `allow_clients` is visible only to a client whose verified TLS certificate
subject matches an entry; with `allow_addresses`, only to TCP clients from those networks
(Unix-socket clients are governed by the socket's file permissions). An export a client may
not use is absent from its LIST and unknown to its INFO/GO, so its name does not leak.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nbdguard.config import ExportConfig, parse_subject
from nbdguard.protocol.handshake import ExportInfo
from nbdguard.server.exports import ExportRegistry

# ssl.getpeercert() attribute names -> the short names used in config subjects
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "emailAddress": "emailAddress",
}


@dataclass(slots=True)
class ClientIdentity:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # None: Unix socket
    subject: dict[str, str] = field(default_factory=dict)  # verified certificate only

    @classmethod
    def from_peer(cls, peer: Any) -> ClientIdentity:
        if isinstance(peer, tuple) and peer:
            try:
                return cls(ipaddress.ip_address(str(peer[0]).split("%")[0]))
            except ValueError:
                pass
        return cls(None)

    def set_certificate(self, certificate: dict[str, Any] | None) -> None:
        self.subject = {}
        for rdn in (certificate or {}).get("subject", ()):
            for key, value in rdn:
                self.subject[_SHORT_NAMES.get(key, key)] = value

    def describe(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.subject.items())


def allows(config: ExportConfig, client: ClientIdentity) -> bool:
    if config.allow_addresses and client.address is not None:
        address = client.address
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not any(address in network for network in config.allow_addresses):
            return False
    if config.allow_clients:
        if not client.subject:
            return False
        return any(_matches(parse_subject(entry), client.subject) for entry in config.allow_clients)
    return True


def _matches(wanted: dict[str, str], subject: dict[str, str]) -> bool:
    return all(subject.get(key) == value for key, value in wanted.items())


class ClientView:
    """The handshake's ExportDirectory for one connection."""

    def __init__(
        self,
        registry: ExportRegistry,
        client: ClientIdentity,
        on_limit: Callable[[str, str], None] = lambda limit, export: None,
    ) -> None:
        self.registry = registry
        self.client = client
        self.on_limit = on_limit

    def visible_exports(self) -> Iterable[ExportInfo]:
        return [
            export.info
            for export in self.registry.exports.values()
            if allows(export.config, self.client)
        ]

    def find(self, name: str) -> ExportInfo | None:
        export = self.registry.get(name)
        if export is None or not allows(export.config, self.client):
            return None
        return export.info

    def admit(self, name: str) -> str | None:
        export = self.registry.get(name)
        limit = export.config.max_connections if export is not None else None
        if export is None or limit is None or export.connections < limit:
            return None
        self.on_limit("export_max_connections", name)
        return f"the export already has its maximum of {limit} connections"
