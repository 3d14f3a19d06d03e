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

# ssl.getpeercert() attribute names -> the short names used in config subjects and, for
# those RFC 4514 section 3 defines (CN, L, ST, O, OU, C, STREET, DC, UID), in logged subjects
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "emailAddress",
}
_ESCAPED = frozenset(',+="\\<>;')  # backslash-escaped anywhere in a value (RFC 4514 2.4)

RDN = tuple[tuple[str, str], ...]  # one RelativeDistinguishedName: (type, value) pairs


@dataclass(slots=True)
class ClientIdentity:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # None: Unix socket
    subject: dict[str, str] = field(default_factory=dict)  # verified certificate only
    rdns: tuple[RDN, ...] = ()  # the whole subject, in certificate (ASN.1) order

    @classmethod
    def from_peer(cls, peer: Any) -> ClientIdentity:
        if isinstance(peer, tuple) and peer:
            try:
                return cls(ipaddress.ip_address(str(peer[0]).split("%")[0]))
            except ValueError:
                pass
        return cls(None)

    def set_certificate(self, certificate: dict[str, Any] | None) -> str | None:
        """Take the verified certificate's subject; return why it must be refused, if so.

        allow_clients matches one value per attribute: a subject that repeats one (two CNs,
        say) has no single identity, and matching either would let a CA-issued "CN=web01"
        pass for whatever else it names, so such a certificate is refused, not guessed at.
        """
        self.rdns = tuple(
            tuple((_SHORT_NAMES.get(key, key), str(value)) for key, value in rdn)
            for rdn in (certificate or {}).get("subject", ())
        )
        self.subject = {}
        repeated: list[str] = []
        for key, value in (pair for rdn in self.rdns for pair in rdn):
            if key in self.subject and key not in repeated:
                repeated.append(key)
            self.subject[key] = value
        if not repeated:
            return None
        self.subject = {}  # no identity to match on, even if a caller forgets the refusal
        return (
            f"the client certificate's subject repeats {', '.join(repeated)}: it names more "
            f"than one identity and cannot be matched against allow_clients"
        )

    def describe(self) -> str:
        """The whole subject as an RFC 4514 string (most specific RDN first)."""
        return rfc4514_subject(self.rdns)


def rfc4514_subject(rdns: Iterable[RDN]) -> str:
    """RFC 4514 section 2: RDNs in reverse (ASN.1) order joined by ",", the attributes of a
    multi-valued RDN by "+", each value escaped."""
    return ",".join(
        "+".join(f"{key}={escape_value(value)}" for key, value in rdn)
        for rdn in reversed(tuple(rdns))
    )


def escape_value(value: str) -> str:
    """Escape one attribute value (RFC 4514 section 2.4): the special characters with a
    backslash, a leading "#" or space and a trailing space likewise, and control characters
    (NUL included) as backslash-hex, so a logged subject is one unambiguous line."""
    out = [_escape_char(char) for char in value]
    if out and value[0] in "# ":
        out[0] = "\\" + value[0]
    if out and value[-1] == " ":
        out[-1] = "\\ "
    return "".join(out)


def _escape_char(char: str) -> str:
    if char in _ESCAPED:
        return "\\" + char
    if char < " " or char == "\x7f":
        return f"\\{ord(char):02X}"
    return char


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
