"""Client identities: certificate subjects as RFC 4514 strings, refused when ambiguous, what
allow_clients/allow_addresses let through, and access changes applied to an open export."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nbdguard.config import ExportConfig
from nbdguard.protocol.constants import TransmissionFlag
from nbdguard.protocol.handshake import ExportInfo
from nbdguard.server.access import ClientIdentity, allows, escape_value, rfc4514_subject
from nbdguard.server.exports import Export, transmission_flags
from nbdguard.storage.device import Capabilities


def certificate(*rdns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """What ssl.getpeercert() returns: the subject's RDNs in ASN.1 order, long names."""
    return {"subject": rdns}


def identity(*rdns: tuple[tuple[str, str], ...]) -> tuple[ClientIdentity, str | None]:
    client = ClientIdentity(ipaddress.ip_address("192.0.2.7"))
    return client, client.set_certificate(certificate(*rdns))


def export(**access: Any) -> ExportConfig:
    return ExportConfig(name="vm1", path=Path("/images/vm1.raw"), format="raw", **access)


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("web01", "web01"),
        ("Example, Inc.", "Example\\, Inc."),
        ("a+b", "a\\+b"),
        ("x=y", "x\\=y"),
        ('say "hi"', 'say \\"hi\\"'),
        ("back\\slash", "back\\\\slash"),
        ("<tag>", "\\<tag\\>"),
        ("a;b", "a\\;b"),
        ("#hash", "\\#hash"),
        ("mid#hash", "mid#hash"),  # '#' is special only in first place
        (" lead", "\\ lead"),
        ("trail ", "trail\\ "),
        (" ", "\\ "),
        ("in side", "in side"),
        ("nul\x00", "nul\\00"),
        ("line\nbreak", "line\\0Abreak"),
        ("caf\u00e9", "caf\u00e9"),  # RFC 4514 strings are UTF-8: no escape needed
        ("", ""),
    ],
)
def test_values_are_escaped_as_rfc4514_says(value: str, escaped: str) -> None:
    assert escape_value(value) == escaped


def test_subject_is_printed_most_specific_first_with_every_attribute() -> None:
    client, refusal = identity(
        (("countryName", "US"),),
        (("organizationName", "Example, Inc."),),
        (("organizationalUnitName", "Ops"),),
        (("commonName", "web01"),),
        (("emailAddress", "ops@example.com"),),
    )
    assert refusal is None
    assert (
        client.describe() == "emailAddress=ops@example.com,CN=web01,OU=Ops,O=Example\\, Inc.,C=US"
    )
    assert client.subject["CN"] == "web01" and client.subject["O"] == "Example, Inc."


def test_multi_valued_rdn_is_joined_with_plus() -> None:
    client, refusal = identity(
        (("commonName", "web01"), ("userId", "42")), (("domainComponent", "example"),)
    )
    assert refusal is None
    assert client.describe() == "DC=example,CN=web01+UID=42"


def test_rfc4514_of_nothing_is_empty() -> None:
    assert rfc4514_subject(()) == ""
    client, refusal = identity()
    assert refusal is None and client.describe() == "" and client.subject == {}


@pytest.mark.parametrize(
    "rdns",
    [
        ((("commonName", "db02"),), (("commonName", "web01"),)),  # two CNs, two RDNs
        ((("commonName", "db02"), ("commonName", "web01")),),  # two CNs, one RDN
        ((("organizationName", "A"),), (("commonName", "web01"),), (("organizationName", "B"),)),
        ((("commonName", "x"),), (("someUnknownName", "1"),), (("someUnknownName", "2"),)),
    ],
)
def test_a_subject_that_repeats_an_attribute_is_refused(rdns: Any) -> None:
    client, refusal = identity(*rdns)
    assert refusal is not None and "repeats" in refusal
    assert client.subject == {}  # nothing to match on, not the last value
    assert not allows(export(allow_clients=("CN=web01",)), client)
    assert not allows(export(allow_clients=("CN=db02",)), client)
    # the log shows every attribute, the one that would have been ignored included
    for rdn in rdns:
        for _, value in rdn:
            assert value in client.describe()


def test_the_refusal_names_the_repeated_attribute() -> None:
    _, refusal = identity(
        (("commonName", "a"),), (("organizationName", "O"),), (("commonName", "b"),)
    )
    assert refusal is not None and "CN" in refusal and "O," not in refusal


def test_a_new_certificate_replaces_the_old_subject() -> None:
    client, _ = identity((("commonName", "a"),), (("commonName", "b"),))
    assert client.set_certificate(certificate((("commonName", "web01"),))) is None
    assert client.subject == {"CN": "web01"} and client.describe() == "CN=web01"
    assert client.set_certificate(None) is None
    assert client.subject == {} and client.describe() == ""


def test_allow_clients_matches_every_named_attribute() -> None:
    client, _ = identity((("organizationName", "Example"),), (("commonName", "web01"),))
    assert allows(export(allow_clients=("CN=web01",)), client)
    assert allows(export(allow_clients=("O=Example,CN=web01",)), client)
    assert not allows(export(allow_clients=("O=Other,CN=web01",)), client)
    assert not allows(export(allow_clients=("CN=web01",)), ClientIdentity(None))


def test_allow_addresses_applies_to_tcp_clients_only() -> None:
    lan = export(allow_addresses=(ipaddress.ip_network("10.0.0.0/8"),))
    assert allows(lan, ClientIdentity(ipaddress.ip_address("10.1.2.3")))
    assert allows(lan, ClientIdentity(ipaddress.ip_address("::ffff:10.1.2.3")))
    assert not allows(lan, ClientIdentity(ipaddress.ip_address("192.0.2.7")))
    assert allows(lan, ClientIdentity(None))  # Unix socket: file permissions govern


class _Device:
    """Just what Export.reconfigure looks at."""

    def __init__(self, read_only: bool) -> None:
        self.capabilities = Capabilities(
            read_only=read_only, multi_conn=True, fast_zero=True, sparse_reads=True
        )


def opened(config: ExportConfig, *, device_read_only: bool = False) -> Export:
    device = _Device(device_read_only or config.read_only)
    flags = transmission_flags(device.capabilities, read_only=config.read_only)
    info = ExportInfo(config.name, "", 1 << 20, flags, 1, 4096, 1 << 25)
    return Export(config, device, info, metrics=None)  # type: ignore[arg-type]


def test_access_keys_apply_to_the_open_export() -> None:
    served = opened(export())
    tightened = export(
        allow_clients=("CN=web01",),
        allow_addresses=(ipaddress.ip_network("10.0.0.0/8"),),
        max_connections=1,
    )
    assert served.reconfigure(tightened) == ["allow_clients", "allow_addresses", "max_connections"]
    assert served.config is tightened
    assert not served.info.flags & TransmissionFlag.READ_ONLY


def test_read_only_on_a_writable_device_is_advertised_both_ways() -> None:
    served = opened(export())
    assert served.info.flags & TransmissionFlag.SEND_TRIM
    assert served.reconfigure(export(read_only=True)) == ["read_only"]
    assert served.info.flags & TransmissionFlag.READ_ONLY
    assert not served.info.flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_FUA)
    assert served.reconfigure(export()) == ["read_only"]
    assert not served.info.flags & TransmissionFlag.READ_ONLY


@pytest.mark.parametrize(
    "change",
    [
        {"path": Path("/images/other.raw")},
        {"header_guard": "strict"},
        {"description": "new"},
        {"header_guard": "off", "allow_clients": ("CN=web01",)},  # mixed: nothing applies
    ],
)
def test_changes_that_need_a_reopen_apply_nothing(change: dict[str, Any]) -> None:
    original = export()
    served = opened(original)
    info = served.info
    assert served.reconfigure(replace(original, **change)) is None
    assert served.config is original and served.info is info


def test_read_only_cannot_be_cleared_on_a_device_opened_read_only() -> None:
    original = export(read_only=True)
    served = opened(original)
    assert served.reconfigure(export()) is None
    assert served.config is original and served.info.flags & TransmissionFlag.READ_ONLY
