"""The header rule sets, on sectors built byte by byte from the reference tables
(shared/reference/header-signatures.md), plus property tests over mutated headers."""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nbdguard.guard import signatures
from nbdguard.guard.signatures import (
    KNOWN_FORMATS,
    RULE_SET_NAMES,
    RULE_SETS,
    Rule,
    detect_header,
)

RULE_SET_PARAMS = pytest.mark.parametrize("rule_set", ["qemu", "strict"])


def sector(*parts: tuple[int, bytes]) -> bytes:
    """512 zero bytes with each (offset, bytes) part written in."""
    data = bytearray(512)
    for offset, raw in parts:
        data[offset : offset + len(raw)] = raw
    assert len(data) == 512, "a part ran past the sector"
    return bytes(data)


def be16(value: int) -> bytes:
    return struct.pack(">H", value)


def be32(value: int) -> bytes:
    return struct.pack(">I", value)


def le32(value: int) -> bytes:
    return struct.pack("<I", value)


def qfi(version: int, fourth: bytes = b"\xfb") -> bytes:
    return sector((0, b"QFI" + fourth + be32(version)))


def bochs(version: int, *, magic: bytes = b"Bochs Virtual HD Image\0") -> bytes:
    return sector((0, magic), (32, b"Redolog\0"), (48, b"Growing\0"), (64, le32(version)))


CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
VDI = sector((64, b"\x7f\x10\xda\xbe"))

# (format, case, sector): QEMU's probes detect these, so both rule sets must.
QEMU_HEADERS: list[tuple[str, str, bytes]] = [
    ("qcow2", "version 2", qfi(2)),
    ("qcow2", "version 3", qfi(3)),
    ("qcow2", "version 0x80000000 (unsigned compare)", qfi(0x80000000)),
    ("qcow2", "version 0xffffffff", qfi(0xFFFFFFFF)),
    ("qcow2", "little-endian 1 reads as 0x01000000", sector((0, b"QFI\xfb\x01\0\0\0"))),
    ("qcow", "version 1", qfi(1)),
    ("vmdk", "COWD", sector((0, b"COWD"))),
    ("vmdk", "KDMV, version not checked", sector((0, b"KDMV" + le32(99)))),
    ("vmdk", "text descriptor", sector((0, b"# Disk DescriptorFile\nversion=1\n"))),
    ("vdi", "signature only", VDI),
    ("vdi", "signature and any version", sector((64, b"\x7f\x10\xda\xbe" + le32(0xDEAD)))),
    ("vpc", "conectix", sector((0, b"conectix"))),
    ("vhdx", "vhdxfile", sector((0, b"vhdxfile"))),
    ("qed", "QED\\0", sector((0, b"QED\0"))),
    ("parallels", "WithoutFreeSpace v2", sector((0, b"WithoutFreeSpace" + le32(2)))),
    ("parallels", "WithouFreSpacExt v2", sector((0, b"WithouFreSpacExt" + le32(2)))),
    ("bochs", "version 2", bochs(0x00020000)),
    ("bochs", "version 1", bochs(0x00010000)),
    ("luks", "LUKS1", sector((0, b"LUKS\xba\xbe" + be16(1)))),
    ("cloop", "exact preamble", sector((0, CLOOP))),
    ("cloop", "preamble and payload", sector((0, CLOOP + b"\xff" * 40))),
]

# (format, case, sector, what qemu says): the extra libvirt and vmd rules of `strict`.
STRICT_EXTRA_HEADERS: list[tuple[str, str, bytes, str | None]] = [
    ("qcow", 'libvirt "QFI" without 0xFB, v1', qfi(1, b"\0"), None),
    ("qcow2", 'libvirt "QFI" without 0xFB, v2', qfi(2, b"\0"), None),
    ("qcow2", 'libvirt "QFI" without 0xFB, v3', qfi(3, b"x"), None),
    ("qed", 'libvirt "QED\\x01"', sector((0, b"QED\x01")), None),
    ("qed", 'libvirt "QED\\xff"', sector((0, b"QED\xff")), None),
    ("ploop", "libvirt WithouFreSpacExt v1", sector((0, b"WithouFreSpacExt" + le32(1))), None),
    ("ploop", "libvirt WithouFreSpacExt v0", sector((0, b"WithouFreSpacExt")), None),
    ("cow", 'libvirt "OOOM" v2', sector((0, b"OOOM" + be32(2))), None),
    ("qcow2", 'vmd "QFI\\xfb" v0', qfi(0), None),
    # QEMU detects these too; libvirt's rule is narrower.
    ("vmdk", 'libvirt "KDMV" v1', sector((0, b"KDMV" + le32(1))), "vmdk"),
    ("vpc", "libvirt conectix v1.0", sector((0, b"conectix"), (12, be32(0x00010000))), "vpc"),
    ("vdi", "libvirt vdi v1.1", sector((64, b"\x7f\x10\xda\xbe" + le32(0x00010001))), "vdi"),
    ("luks", "libvirt LUKS1", sector((0, b"LUKS\xba\xbe" + be16(1))), "luks"),
]

MBR = sector(
    (0, b"\xfa\x33\xc0\x8e\xd0\xbc\x00\x7c"),  # cli; xor ax, ax; mov ss, ax; mov sp, 7c00
    (446, bytes([0x80, 0x20, 0x21, 0x00, 0x83, 0xFE, 0xFF, 0xFF]) + le32(2048) + le32(204800)),
    (510, b"\x55\xaa"),
)
GPT_PROTECTIVE_MBR = sector(
    (446, bytes([0x00, 0x00, 0x02, 0x00, 0xEE, 0xFF, 0xFF, 0xFF]) + le32(1) + le32(0xFFFFFFFF)),
    (510, b"\x55\xaa"),
)
FAT = sector(
    (0, b"\xeb\x3c\x90MSDOS5.0" + struct.pack("<HBHBHHBH", 512, 8, 4, 2, 512, 0, 0xF8, 200)),
    (38, b"\x29\x12\x34\x56\x78NO NAME    FAT16   "),
    (510, b"\x55\xaa"),
)
NTFS = sector((0, b"\xeb\x52\x90NTFS    " + struct.pack("<HB", 512, 8)), (510, b"\x55\xaa"))
EXT4_SECTOR0 = bytes(512)  # the ext superblock (magic 0xEF53 at 1024 + 56) is past sector 0

# QEMU's probes detect none of these (reference: "Not detected by QEMU").
NOT_DETECTED_BY_QEMU: dict[str, bytes] = {
    "all zeros": bytes(512),
    "mbr": MBR,
    "gpt protective mbr": GPT_PROTECTIVE_MBR,
    "fat": FAT,
    "ntfs": NTFS,
    "ext4 sector 0": EXT4_SECTOR0,
    "QFI\\xfb version 0": qfi(0),
    "VMDK": sector((0, b"VMDK" + le32(1))),
    "version=4": sector((0, b"version=4\n")),
    "QED\\x01": sector((0, b"QED\x01")),
    "parallels v1": sector((0, b"WithoutFreeSpace" + le32(1))),
    "parallels-ext v1": sector((0, b"WithouFreSpacExt" + le32(1))),
    "luks2": sector((0, b"LUKS\xba\xbe" + be16(2))),
    "truncated cloop line": sector((0, CLOOP[:-1])),
    "half a cloop preamble": sector((0, CLOOP[:40])),
    "OOOM v2": sector((0, b"OOOM" + be32(2))),
    "OOOM v0": sector((0, b"OOOM")),
}
STRICT_DETECTS = {"QFI\\xfb version 0", "QED\\x01", "parallels-ext v1", "OOOM v2"}

# Near misses that neither rule set may take for a header.
NOT_DETECTED_BY_ANY: dict[str, bytes] = {
    **{name: data for name, data in NOT_DETECTED_BY_QEMU.items() if name not in STRICT_DETECTS},
    "QFI\\x00 version 0": qfi(0, b"\0"),
    "QFI\\x00 version 4 (libvirt knows 2 and 3)": qfi(4, b"\0"),
    "QF": sector((0, b"QF\xfb\0\0\0\x03")),
    "OOOM v1": sector((0, b"OOOM" + be32(1))),
    "OOOM v3": sector((0, b"OOOM" + be32(3))),
    "OOOM little-endian 2": sector((0, b"OOOM" + le32(2))),
    "luks1 written little-endian": sector((0, b"LUKS\xba\xbe\x01\x00")),
    "luks magic cut short": sector((0, b"LUKS\xba\0\0\x01")),
    "kdmv lower case": sector((0, b"kdmv" + le32(1))),
    "conectiX": sector((0, b"conectiX")),
    "vhdxfil": sector((0, b"vhdxfil")),
    "vdi signature at 63": sector((63, b"\x7f\x10\xda\xbe")),
    "vdi signature at 65": sector((65, b"\x7f\x10\xda\xbe")),
    "parallels version 2 big-endian": sector((0, b"WithoutFreeSpace" + be32(2))),
    "bochs version 3": bochs(0x00030000),
    "bochs magic without NUL": bochs(0x00020000, magic=b"Bochs Virtual HD ImageX"),
    "bochs wrong type": sector(
        (0, b"Bochs Virtual HD Image\0"), (32, b"Redolog!"), (48, b"Growing\0"), (64, le32(0x20000))
    ),
    "cloop with one byte changed": sector((0, CLOOP.replace(b"V2.0", b"V2.1"))),
}


# --- the tables ---------------------------------------------------------------------------


def test_known_formats_and_rule_set_names() -> None:
    expected = {"qcow2", "qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "parallels", "bochs", "luks",
                "cloop", "cow", "ploop"}  # fmt: skip
    assert expected == KNOWN_FORMATS
    assert RULE_SET_NAMES == ("qemu", "strict") == tuple(RULE_SETS)


def test_strict_is_the_qemu_rules_then_extra_rules() -> None:
    qemu, strict = RULE_SETS["qemu"], RULE_SETS["strict"]
    assert strict[: len(qemu)] == qemu
    assert len(strict) > len(qemu)


def test_every_rule_names_a_known_format_and_says_what_it_checks() -> None:
    for rules in RULE_SETS.values():
        for rule in rules:
            assert rule.format in KNOWN_FORMATS
            assert rule.description.strip()
    assert {rule.format for rule in RULE_SETS["qemu"]} == KNOWN_FORMATS - {"cow", "ploop"}
    assert {rule.format for rule in RULE_SETS["strict"]} == KNOWN_FORMATS


def test_a_rule_for_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="dmg"):
        Rule("dmg", "by file name", lambda _sector: False)


def test_rule_sets_are_read_only() -> None:
    with pytest.raises(TypeError):
        RULE_SETS["everything"] = ()  # type: ignore[index]


@pytest.mark.parametrize("rule_set", ["", "QEMU", "libvirt", "probe-everything"])
def test_unknown_rule_set(rule_set: str) -> None:
    with pytest.raises(ValueError, match="rule set"):
        detect_header(bytes(512), rule_set)


# --- headers and near misses ----------------------------------------------------------------


@RULE_SET_PARAMS
@pytest.mark.parametrize(
    ("fmt", "data"),
    [pytest.param(fmt, data, id=f"{fmt}: {case}") for fmt, case, data in QEMU_HEADERS],
)
def test_qemu_headers_are_detected_by_both_sets(fmt: str, data: bytes, rule_set: str) -> None:
    assert detect_header(data, rule_set) == fmt


def test_every_qemu_format_has_a_header_sample() -> None:
    assert {fmt for fmt, _, _ in QEMU_HEADERS} == {rule.format for rule in RULE_SETS["qemu"]}


@pytest.mark.parametrize(
    ("fmt", "data", "by_qemu"),
    [pytest.param(f, data, q, id=f"{f}: {case}") for f, case, data, q in STRICT_EXTRA_HEADERS],
)
def test_extra_rules_of_the_strict_set(fmt: str, data: bytes, by_qemu: str | None) -> None:
    assert detect_header(data, "strict") == fmt
    assert detect_header(data, "qemu") == by_qemu


def _libvirt_rule(fmt: str) -> Rule:
    extra = RULE_SETS["strict"][len(RULE_SETS["qemu"]) :]
    (rule,) = [rule for rule in extra if rule.format == fmt and "libvirt" in rule.description]
    return rule


@pytest.mark.parametrize(
    ("fmt", "matching", "not_matching"),
    [
        ("vmdk", [sector((0, b"KDMV" + le32(v))) for v in (1, 2, 3)],
         [sector((0, b"KDMV" + le32(v))) for v in (0, 4)] + [sector((0, b"KDMV" + be32(1)))]),
        ("vpc", [sector((0, b"conectix"), (12, be32(0x00010000)))],
         [sector((0, b"conectix")), sector((0, b"conectix"), (12, le32(0x00010000)))]),
        ("vdi", [sector((64, b"\x7f\x10\xda\xbe" + le32(0x00010001)))],
         [VDI, sector((64, b"\x7f\x10\xda\xbe" + le32(0x00010000)))]),
        ("luks", [sector((0, b"LUKS\xba\xbe" + be16(1)))],
         [sector((0, b"LUKS\xba\xbe" + be16(2))), sector((0, b"LUKS\xba\xbe"))]),
    ],
)  # fmt: skip
def test_libvirt_rules_shadowed_by_qemu_rules(
    fmt: str, matching: list[bytes], not_matching: list[bytes]
) -> None:
    """In `strict` QEMU's wider rule fires first, so these rules are checked on their own."""
    rule = _libvirt_rule(fmt)
    assert all(rule.matches(data) for data in matching)
    assert not any(rule.matches(data) for data in not_matching)


@pytest.mark.parametrize(("name", "data"), sorted(NOT_DETECTED_BY_QEMU.items()))
def test_not_detected_by_qemu(name: str, data: bytes) -> None:
    assert detect_header(data, "qemu") is None, name


@RULE_SET_PARAMS
@pytest.mark.parametrize(("name", "data"), sorted(NOT_DETECTED_BY_ANY.items()))
def test_near_misses_and_real_content_pass_both_sets(name: str, data: bytes, rule_set: str) -> None:
    assert detect_header(data, rule_set) is None, name


def test_ext4_superblock_past_sector_0_is_not_looked_at() -> None:
    image_start = bytearray(2048)
    image_start[1024 + 56 : 1024 + 58] = b"\x53\xef"  # s_magic 0xEF53
    assert detect_header(image_start, "strict") is None


# --- qcow2 version boundary and endianness --------------------------------------------------


@pytest.mark.parametrize(
    ("version_bytes", "qemu", "strict"),
    [
        (b"\0\0\0\0", None, "qcow2"),
        (b"\0\0\0\x01", "qcow", "qcow"),
        (b"\0\0\0\x02", "qcow2", "qcow2"),
        (b"\x01\0\0\0", "qcow2", "qcow2"),  # 0x01000000
        (b"\x7f\xff\xff\xff", "qcow2", "qcow2"),
        (b"\x80\0\0\0", "qcow2", "qcow2"),
        (b"\xff\xff\xff\xff", "qcow2", "qcow2"),
    ],
)
def test_qcow_version_is_an_unsigned_big_endian_u32_at_4(
    version_bytes: bytes, qemu: str | None, strict: str | None
) -> None:
    data = sector((0, b"QFI\xfb" + version_bytes))
    assert detect_header(data, "qemu") == qemu
    assert detect_header(data, "strict") == strict


def test_qcow_version_is_read_at_offset_4_exactly() -> None:
    assert detect_header(sector((0, b"QFI\xfb\0\0\0\0\x02")), "qemu") is None  # 2 at offset 8
    assert detect_header(sector((0, b"QFI\xfb\0\0\x02")), "qemu") == "qcow2"  # 0x00000200


# --- the VMDK text descriptor ---------------------------------------------------------------

FILLER_COMMENT = b"#" + b"x" * 500 + b"\n"  # 502 bytes: the next line starts at offset 502
# 600 bytes each: a version line at 507..516 straddles byte 512, one at 502..511 fits.
STRADDLING_VERSION_LINE = b"#" + b"x" * 505 + b"\n" + b"version=1\n" + bytes(83)
FITTING_VERSION_LINE = FILLER_COMMENT + b"version=1\n" + bytes(88)

VMDK_DESCRIPTOR_CASES: list[tuple[str, bytes, bool]] = [
    ("version=1 at offset 0", b"version=1\n", True),
    ("version=2", b"version=2\n", True),
    ("version=3", b"version=3\n", True),
    ("comment then version", b"# Disk DescriptorFile\nversion=1\n", True),
    ("crlf endings", b"# Disk DescriptorFile\r\nversion=1\r\n", True),
    ("crlf version 3", b"version=3\r\n", True),
    ("leading-spaces line", b"   \nversion=1\n", True),
    ("spaces then crlf", b"  \r\nversion=2\r\n", True),
    ("mixed blank and comment lines", b" \n#a\n  \r\n#\nversion=3\n", True),
    ("comment holding NUL bytes", b"#\0\0\x01\xff\r\0\nversion=1\n", True),
    ("empty comments", b"#\n" * 250 + b"version=1\n", True),  # version line ends at 510
    ("version line ends at 512", FILLER_COMMENT + b"version=1\n", True),
    ("crlf version line ends at 512", b"#" + b"x" * 499 + b"\n" + b"version=1\r\n", True),
    ("blank line first", b"\nversion=1\n", False),
    ("crlf blank line first", b"\r\nversion=1\n", False),
    ("tab line", b"\tversion=1\n", False),
    ("tab-only line", b"\t\nversion=1\n", False),
    ("spaces then tab", b"  \t\nversion=1\n", False),
    ("indented version", b"  version=1\n", False),
    ("spaces and two CRs", b"  \r\r\nversion=1\n", False),
    ("comment without terminating newline", b"#" + b"x" * 511, False),
    ("comment running into zeros", b"# Disk DescriptorFile", False),
    ("comment then NUL line", b"# Disk DescriptorFile\n", False),
    ("spaces up to the end", b" " * 512, False),
    ("spaces and CR at the end", b" " * 511 + b"\r", False),
    ("version=1 ends at 512 without newline", b"#" + FILLER_COMMENT + b"version=1", False),
    ("version=1 and CR ending at 512", FILLER_COMMENT + b"version=1\r", False),
    ("version=4", b"version=4\n", False),
    ("version=0", b"version=0\n", False),
    ("version=10", b"version=10\n", False),
    ("version=1 and space", b"version=1 \n", False),
    ("version=1 and NUL", b"version=1", False),
    ("version=1, CR, NUL", b"version=1\r", False),
    ("Version=1", b"Version=1\n", False),
    ("version = 1", b"version = 1\n", False),
    ("createType first", b'createType="monolithicSparse"\nversion=1\n', False),
]


@RULE_SET_PARAMS
@pytest.mark.parametrize(
    ("start", "is_vmdk"),
    [pytest.param(start, vmdk, id=case) for case, start, vmdk in VMDK_DESCRIPTOR_CASES],
)
def test_vmdk_descriptor_scan(start: bytes, is_vmdk: bool, rule_set: str) -> None:
    assert len(start) <= 512
    data = sector((0, start))
    assert detect_header(data, rule_set) == ("vmdk" if is_vmdk else None)
    assert detect_header(start, rule_set) == detect_header(data, rule_set)  # padded input


def test_vmdk_scan_stops_at_512_bytes() -> None:
    """A version line straddling byte 512 would count only if the scan ran past the sector."""
    assert len(STRADDLING_VERSION_LINE) == len(FITTING_VERSION_LINE) == 600
    assert detect_header(STRADDLING_VERSION_LINE, "strict") is None
    assert detect_header(FITTING_VERSION_LINE, "strict") == "vmdk"


# The reference's scan, restated as a regular expression: the alternatives start with
# different bytes, so matching is the same deterministic line-by-line walk.
VMDK_ORACLE = re.compile(rb"(?:#[^\n]*\n| +\r?\n)*version=[123]\r?\n")

vmdk_lines = st.one_of(
    st.binary(max_size=120).map(lambda text: b"#" + text.replace(b"\n", b"") + b"\n"),
    st.tuples(st.integers(1, 6), st.booleans()).map(lambda t: b" " * t[0] + b"\r" * t[1] + b"\n"),
    st.sampled_from([b"\n", b"\r\n", b"\t\n", b" x\n", b"  \r\r\n", b"#", b" ", b"\r", b"\0"]),
    st.tuples(
        st.sampled_from(b"0123459"), st.sampled_from([b"\n", b"\r\n", b"", b"\r", b" \n"])
    ).map(lambda t: b"version=" + bytes([t[0]]) + t[1]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(vmdk_lines, max_size=40), st.sampled_from(["qemu", "strict"]))
@example([b"#" + b"x" * 501 + b"\n", b"version=1\n"], "qemu")
@example([b"#" + b"x" * 502 + b"\n", b"version=1\n"], "qemu")
def test_vmdk_scan_agrees_with_the_reference(lines: list[bytes], rule_set: str) -> None:
    text = b"".join(lines)[:600]
    expected = VMDK_ORACLE.match(text[:512].ljust(512, b"\0")) is not None
    only_vmdk = KNOWN_FORMATS - {"vmdk"}  # isolate the vmdk rules from the others
    assert (detect_header(text, rule_set, only_vmdk) == "vmdk") is expected


# --- allowed formats ------------------------------------------------------------------------

LUKS1 = sector((0, b"LUKS\xba\xbe" + be16(1)))


@RULE_SET_PARAMS
def test_allowed_format_is_skipped(rule_set: str) -> None:
    assert detect_header(LUKS1, rule_set) == "luks"
    assert detect_header(LUKS1, rule_set, frozenset({"luks"})) is None
    assert detect_header(LUKS1, rule_set, frozenset({"qcow2", "vdi"})) == "luks"
    assert detect_header(qfi(3), rule_set, frozenset({"luks"})) == "qcow2"


def test_skipping_goes_on_to_later_rules() -> None:
    both = sector((0, b"QFI\xfb" + be32(3)), (64, b"\x7f\x10\xda\xbe"))
    assert detect_header(both, "qemu") == "qcow2"
    assert detect_header(both, "qemu", frozenset({"qcow2"})) == "vdi"
    assert detect_header(both, "qemu", frozenset({"qcow2", "vdi"})) is None


def test_allowing_a_format_skips_its_strict_rules_too() -> None:
    allow_qcow2 = frozenset({"qcow2"})
    for data in (qfi(0), qfi(3), qfi(3, b"\0"), qfi(0xFFFFFFFF)):
        assert detect_header(data, "strict", allow_qcow2) is None
    assert detect_header(sector((0, b"QED\x07")), "strict", frozenset({"qed"})) is None


def test_strict_reports_related_formats_under_their_own_names() -> None:
    """vmd takes any "QFI\\xfb" for qcow2 and libvirt any WithouFreSpacExt for ploop, so
    allowing qcow or parallels alone does not let those headers through `strict`."""
    assert detect_header(qfi(1), "strict", frozenset({"qcow"})) == "qcow2"
    assert detect_header(qfi(1), "qemu", frozenset({"qcow"})) is None
    ext_v2 = sector((0, b"WithouFreSpacExt" + le32(2)))
    assert detect_header(ext_v2, "strict", frozenset({"parallels"})) == "ploop"
    assert detect_header(ext_v2, "strict", frozenset({"parallels", "ploop"})) is None


# --- input shapes ---------------------------------------------------------------------------


def test_short_input_is_zero_padded() -> None:
    assert detect_header(b"QFI\xfb", "qemu") is None  # version reads as 0
    assert detect_header(b"QFI\xfb", "strict") == "qcow2"  # OpenBSD vmd: any version
    assert detect_header(b"QFI\xfb\0\0\0\x02", "qemu") == "qcow2"  # version ends the input
    assert detect_header(b"QFI\xfb\0\0\0", "qemu") is None
    assert detect_header(b"LUKS\xba\xbe\0", "qemu") is None
    assert detect_header(b"LUKS\xba\xbe\0\x01", "qemu") == "luks"
    assert detect_header(VDI[:66], "qemu") is None  # signature cut in half
    assert detect_header(VDI[:68], "qemu") == "vdi"
    for rule_set in RULE_SET_NAMES:
        assert detect_header(b"", rule_set) is None


def test_only_the_first_512_bytes_count() -> None:
    assert detect_header(bytes(512) + qfi(3), "strict") is None
    assert detect_header(sector((0, b"version=1\n")) + b"garbage", "qemu") == "vmdk"


@pytest.mark.parametrize(
    "wrap",
    [
        bytes,
        bytearray,
        memoryview,
        lambda data: memoryview(b"\xff" * 3 + data)[3:],
        lambda data: memoryview(array("I", data)),
        lambda data: memoryview(data).cast("B", (25, 24)),
    ],
    ids=["bytes", "bytearray", "memoryview", "offset view", "u32 view", "2-d view"],
)
def test_any_buffer_is_read_as_its_first_512_bytes(
    wrap: Callable[[bytes], bytes | bytearray | memoryview],
) -> None:
    """Views of wider items or of several dimensions are cut at 512 bytes, not 512 items."""
    for fmt, _, data in QEMU_HEADERS:
        assert detect_header(wrap(data + bytes(88)), "qemu") == fmt
    assert detect_header(wrap(STRADDLING_VERSION_LINE), "qemu") is None
    assert detect_header(wrap(FITTING_VERSION_LINE), "qemu") == "vmdk"


def test_rules_run_on_one_private_512_byte_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client may change its buffer while the check runs: every rule must see the same
    private bytes, zero-padded to 512, whatever happens to the caller's buffer meanwhile."""
    seen: list[bytes] = []
    client_buffer = bytearray(qfi(3)[:100])

    def first(data: bytes) -> bool:
        seen.append(data)
        client_buffer[:4] = b"XXXX"
        return False

    def second(data: bytes) -> bool:
        seen.append(data)
        return data.startswith(b"QFI\xfb")

    spy_rules = (Rule("vdi", "changes the client's buffer", first), Rule("qcow2", "QFI", second))
    monkeypatch.setattr(signatures, "RULE_SETS", {"spy": spy_rules})
    assert detect_header(client_buffer, "spy") == "qcow2"
    assert client_buffer[:4] == b"XXXX"
    assert len(seen) == 2 and seen[0] is seen[1]
    assert type(seen[0]) is bytes
    assert seen[0] == qfi(3)[:100] + bytes(412)


# --- properties -----------------------------------------------------------------------------

SEEDS = [data for _, _, data in QEMU_HEADERS] + [data for _, _, data, _ in STRICT_EXTRA_HEADERS]
SEEDS += list(NOT_DETECTED_BY_ANY.values())


@st.composite
def sectors(draw: st.DrawFn) -> bytes:
    """A known header or near miss (or random bytes) with a few bytes overwritten."""
    if draw(st.booleans()):
        data = bytearray(draw(st.sampled_from(SEEDS)))
    else:
        data = bytearray(draw(st.binary(min_size=512, max_size=512)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, 511))] = draw(st.integers(0, 255))
    return bytes(data)


rule_sets = st.sampled_from(RULE_SET_NAMES)
allowed_sets = st.frozensets(st.sampled_from(sorted(KNOWN_FORMATS)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700), rule_sets, allowed_sets)
def test_random_input_never_raises(data: bytes, rule_set: str, allowed: frozenset[str]) -> None:
    result = detect_header(data, rule_set, allowed)
    assert result is None or (result in KNOWN_FORMATS and result not in allowed)


@settings(max_examples=300, deadline=None)
@given(sectors(), st.binary(min_size=88, max_size=88) | st.just(b"QFI\xfb" * 22), rule_sets)
def test_600_bytes_detect_as_their_first_512(head: bytes, tail: bytes, rule_set: str) -> None:
    assert detect_header(head + tail, rule_set) == detect_header(head, rule_set)


@settings(max_examples=300, deadline=None)
@given(sectors(), st.integers(0, 511), rule_sets)
def test_short_input_detects_as_its_zero_padding(data: bytes, cut: int, rule_set: str) -> None:
    short = data[:cut]
    assert detect_header(short, rule_set) == detect_header(short + bytes(512 - cut), rule_set)


@settings(max_examples=300, deadline=None)
@given(sectors(), allowed_sets)
def test_strict_reports_whatever_qemu_reports(data: bytes, allowed: frozenset[str]) -> None:
    by_qemu = detect_header(data, "qemu", allowed)
    if by_qemu is not None:
        assert detect_header(data, "strict", allowed) == by_qemu


@settings(max_examples=300, deadline=None)
@given(sectors(), rule_sets, allowed_sets)
def test_allowing_other_formats_changes_nothing(
    data: bytes, rule_set: str, allowed: frozenset[str]
) -> None:
    found = detect_header(data, rule_set)
    if found is not None and found not in allowed:
        assert detect_header(data, rule_set, allowed) == found
    assert detect_header(data, rule_set, KNOWN_FORMATS) is None


MAGIC_PREFIXES = (
    b"QFI", b"QED", b"COWD", b"KDMV", b"cone", b"vhdx", b"With", b"Boch", b"LUKS", b"OOOM",
    b"#", b" ", b"version=",
)  # fmt: skip
near_miss_starts = st.sampled_from(
    [magic[:i] + bytes([b ^ 0x20]) + magic[i + 1 : 4] for magic in MAGIC_PREFIXES
     for i, b in enumerate(magic[:4])]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=4, max_size=4) | near_miss_starts, st.binary(min_size=508, max_size=508))
@example(b"QFI\xfa", bytes(508))
@example(b"verz", b"ion=1\n" + bytes(502))
def test_sectors_without_a_magic_are_not_headers(start: bytes, rest: bytes) -> None:
    data = bytearray((start + rest)[:512].ljust(512, b"\0"))
    data[64:72] = bytes(8)  # no vdi signature
    if data.startswith(MAGIC_PREFIXES):
        return
    for rule_set in RULE_SET_NAMES:
        assert detect_header(data, rule_set) is None
