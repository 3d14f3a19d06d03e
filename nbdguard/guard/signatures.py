"""Image-format header signatures: what probing programs recognise in sector 0.

Pure and table-driven. The `qemu` rule set is exactly what QEMU's format probes detect
in the first 512 bytes of a file; `strict` is the `qemu` set followed by the extra rules
of libvirt's storage probe and OpenBSD vmd. Each rule names the format a prober would
report, so a refusal can say what the write would have turned the image into.

Rules run in table order and the first match names the format. QEMU itself lets every
driver score the sector and takes the best; only the reported name can differ (a sector
carrying two headers at once), never whether the sector is detected.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

SECTOR_SIZE = 512

KNOWN_FORMATS: frozenset[str] = frozenset(
    {"qcow2", "qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "parallels", "bochs", "luks",
     "cloop", "cow", "ploop"}
)  # fmt: skip
RULE_SET_NAMES: tuple[str, ...] = ("qemu", "strict")

QCOW_MAGIC = b"QFI\xfb"
QED_MAGIC = b"QED\0"
VDI_SIGNATURE = b"\x7f\x10\xda\xbe"  # little-endian 0xbeda107f
VDI_SIGNATURE_OFFSET = 64
LUKS_MAGIC = b"LUKS\xba\xbe"
PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
PLOOP_MAGIC = b"WithouFreSpacExt"
CLOOP_PREAMBLE = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)
_VMDK_MAGICS = (b"COWD", b"KDMV")  # VMDK3 and VMDK4 sparse extents
_VMDK_VERSION_LINES = tuple(
    b"version=%d%s" % (version, ending) for version in (1, 2, 3) for ending in (b"\n", b"\r\n")
)
_BOCHS_VERSIONS = (0x00020000, 0x00010000)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_LE32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Rule:
    """One prober's test on a whole sector, and the format it would then report."""

    format: str  # one of KNOWN_FORMATS
    description: str  # short human text for logs and refusals
    matches: Callable[[bytes], bool]  # always given exactly SECTOR_SIZE bytes

    def __post_init__(self) -> None:
        if self.format not in KNOWN_FORMATS:
            raise ValueError(f"rule for unknown format {self.format!r}")


def _u16be(sector: bytes, offset: int) -> int:
    value: int = _BE16.unpack_from(sector, offset)[0]
    return value


def _u32be(sector: bytes, offset: int) -> int:
    value: int = _BE32.unpack_from(sector, offset)[0]
    return value


def _u32le(sector: bytes, offset: int) -> int:
    value: int = _LE32.unpack_from(sector, offset)[0]
    return value


def _starts_with(*magics: bytes) -> Callable[[bytes], bool]:
    """A rule that checks nothing but a leading magic (one of several)."""

    def matches(sector: bytes) -> bool:
        return sector.startswith(magics)

    return matches


# --- QEMU's probes -----------------------------------------------------------------------


def _qcow2(sector: bytes) -> bool:
    """QEMU takes any unsigned version >= 2 as qcow2, so 0xFFFFFFFF counts too."""
    return sector.startswith(QCOW_MAGIC) and _u32be(sector, 4) >= 2


def _qcow1(sector: bytes) -> bool:
    """The legacy qcow driver claims only version 1 of the shared magic."""
    return sector.startswith(QCOW_MAGIC) and _u32be(sector, 4) == 1


def _vmdk_descriptor(sector: bytes) -> bool:
    """QEMU's text-descriptor scan: comments and space-only lines may precede the line
    `version=1|2|3`; any other first line (even a blank or tab one) means not vmdk."""
    end = len(sector)
    pos = 0
    while pos < end:
        first = sector[pos]
        if first == 0x23:  # '#': skip to after the next '\n'; the comment may hold any byte
            newline = sector.find(b"\n", pos)
            if newline < 0:
                return False
            pos = newline + 1
        elif first == 0x20:  # ' ': spaces, one optional '\r', then '\n' is required
            while pos < end and sector[pos] == 0x20:
                pos += 1
            if pos < end and sector[pos] == 0x0D:
                pos += 1
            if pos >= end or sector[pos] != 0x0A:
                return False
            pos += 1
        else:
            return sector.startswith(_VMDK_VERSION_LINES, pos)
    return False


def _vmdk(sector: bytes) -> bool:
    """Binary sparse-extent magic, or else a text descriptor."""
    return sector.startswith(_VMDK_MAGICS) or _vmdk_descriptor(sector)


def _vdi(sector: bytes) -> bool:
    """QEMU checks the signature at offset 64 only, not the version."""
    return sector.startswith(VDI_SIGNATURE, VDI_SIGNATURE_OFFSET)


def _parallels(sector: bytes) -> bool:
    """Either parallels magic, and only version 2."""
    return sector.startswith(PARALLELS_MAGICS) and _u32le(sector, 16) == 2


def _bochs(sector: bytes) -> bool:
    """QEMU strcmp()s three NUL-terminated strings, so each terminator is part of the rule."""
    return (
        sector.startswith(b"Bochs Virtual HD Image\0")
        and sector.startswith(b"Redolog\0", 32)
        and sector.startswith(b"Growing\0", 48)
        and _u32le(sector, 64) in _BOCHS_VERSIONS
    )


def _luks1(sector: bytes) -> bool:
    """Only LUKS version 1 is probed; a LUKS2 header is not detected."""
    return sector.startswith(LUKS_MAGIC) and _u16be(sector, 6) == 1


QEMU_RULES: tuple[Rule, ...] = (
    Rule("qcow2", 'magic "QFI\\xfb" and version >= 2', _qcow2),
    Rule("qcow", 'magic "QFI\\xfb" and version 1', _qcow1),
    Rule("vmdk", 'magic "COWD"/"KDMV" or a "version=1|2|3" text descriptor', _vmdk),
    Rule("vdi", "signature 0xbeda107f at offset 64", _vdi),
    Rule("vpc", 'cookie "conectix"', _starts_with(b"conectix")),
    Rule("vhdx", 'signature "vhdxfile"', _starts_with(b"vhdxfile")),
    Rule("qed", 'magic "QED\\0"', _starts_with(QED_MAGIC)),
    Rule("parallels", "parallels magic and version 2", _parallels),
    Rule("bochs", "bochs growing redolog header, version 1 or 2", _bochs),
    Rule("luks", 'magic "LUKS\\xba\\xbe" and version 1', _luks1),
    Rule("cloop", "cloop V2.0 shell preamble", _starts_with(CLOOP_PREAMBLE)),
)


# --- libvirt and OpenBSD vmd --------------------------------------------------------------


def _libvirt_qcow1(sector: bytes) -> bool:
    """libvirt matches "QFI" without the fourth magic byte."""
    return sector.startswith(b"QFI") and _u32be(sector, 4) == 1


def _libvirt_qcow2(sector: bytes) -> bool:
    """libvirt knows qcow2 versions 2 and 3 only, again on "QFI" alone."""
    return sector.startswith(b"QFI") and _u32be(sector, 4) in (2, 3)


def _libvirt_vmdk(sector: bytes) -> bool:
    return sector.startswith(b"KDMV") and _u32le(sector, 4) in (1, 2, 3)


def _libvirt_vpc(sector: bytes) -> bool:
    return sector.startswith(b"conectix") and _u32be(sector, 12) == 0x00010000


def _libvirt_vdi(sector: bytes) -> bool:
    return _vdi(sector) and _u32le(sector, 68) == 0x00010001


def _cow(sector: bytes) -> bool:
    """User-mode Linux COW, which QEMU no longer probes."""
    return sector.startswith(b"OOOM") and _u32be(sector, 4) == 2


# libvirt's vmdk, vpc, vdi and LUKS rules are narrower than QEMU's and so never fire
# first in `strict`; they stay so that the table reads like the reference.
STRICT_EXTRA_RULES: tuple[Rule, ...] = (
    Rule("qcow", 'libvirt: "QFI" and version 1', _libvirt_qcow1),
    Rule("qcow2", 'libvirt: "QFI" and version 2 or 3', _libvirt_qcow2),
    Rule("qed", 'libvirt: "QED"', _starts_with(b"QED")),
    Rule("vmdk", 'libvirt: "KDMV" and version 1-3', _libvirt_vmdk),
    Rule("vpc", 'libvirt: "conectix" and version 0x00010000', _libvirt_vpc),
    Rule("vdi", "libvirt: vdi signature and version 1.1", _libvirt_vdi),
    Rule("ploop", 'libvirt: "WithouFreSpacExt", any version', _starts_with(PLOOP_MAGIC)),
    Rule("cow", 'libvirt: "OOOM" and version 2', _cow),
    Rule("luks", 'libvirt: "LUKS\\xba\\xbe" and version 1', _luks1),
    Rule("qcow2", 'OpenBSD vmd: "QFI\\xfb", any version', _starts_with(QCOW_MAGIC)),
)

RULE_SETS: Mapping[str, tuple[Rule, ...]] = MappingProxyType(
    {"qemu": QEMU_RULES, "strict": QEMU_RULES + STRICT_EXTRA_RULES}
)


def _snapshot(sector: bytes | bytearray | memoryview) -> bytes:
    """A private copy of exactly 512 bytes: the caller's buffer is read once (a client could
    change it after the check), longer input is cut, shorter is zero-filled as QEMU reads
    past end of file."""
    with memoryview(sector) as view:
        if view.ndim == 1 and view.itemsize == 1:
            data = bytes(view[:SECTOR_SIZE])
        else:  # e.g. array("I") or a 2-D view: count bytes, not items
            data = view.tobytes()[:SECTOR_SIZE]
    return data if len(data) == SECTOR_SIZE else data.ljust(SECTOR_SIZE, b"\0")


def detect_header(
    sector: bytes | bytearray | memoryview,
    rule_set: str,
    allowed: frozenset[str] = frozenset(),
) -> str | None:
    """The format of the first rule in `rule_set` the sector matches, skipping rules whose
    format is in `allowed`; None when no prober would take the sector for a formatted image.
    """
    rules = RULE_SETS.get(rule_set)
    if rules is None:
        raise ValueError(f"unknown rule set {rule_set!r} (choose from {', '.join(RULE_SET_NAMES)})")
    data = _snapshot(sector)
    for rule in rules:
        if rule.format not in allowed and rule.matches(data):
            return rule.format
    return None
