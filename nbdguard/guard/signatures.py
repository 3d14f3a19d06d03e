"""Image-format header signatures: what probing programs recognise in sector 0.

Pure and table-driven. The `qemu` rule set is exactly what QEMU's format probes
detect in the first 512 bytes of a file; `strict` adds the extra rules of
libvirt's storage probe and OpenBSD vmd. Each rule names the format a prober
would report, so a refusal can say what the write would have turned the image into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

SECTOR = 512

KNOWN_FORMATS: frozenset[str] = frozenset(
    {"qcow2", "qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "parallels", "bochs", "luks",
     "cloop", "cow", "ploop"}
)  # fmt: skip
RULE_SET_NAMES: tuple[str, ...] = ("qemu", "strict")

QCOW_MAGIC = b"QFI\xfb"
VDI_SIGNATURE = b"\x7f\x10\xda\xbe"  # little-endian 0xbeda107f at offset 64
LUKS_MAGIC = b"LUKS\xba\xbe"
CLOOP_PREFIX = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


@dataclass(frozen=True, slots=True)
class Rule:
    format: str
    description: str
    matches: Callable[[bytes], bool]


def _be32(sector: bytes, offset: int) -> int:
    return int.from_bytes(sector[offset : offset + 4], "big")


def _le32(sector: bytes, offset: int) -> int:
    return int.from_bytes(sector[offset : offset + 4], "little")


def _be16(sector: bytes, offset: int) -> int:
    return int.from_bytes(sector[offset : offset + 2], "big")


def _vmdk_descriptor(sector: bytes) -> bool:
    """QEMU's scan for a VMDK text descriptor: comments and blank-ish lines, then `version=N`."""
    pos = 0
    while pos < len(sector):
        byte = sector[pos : pos + 1]
        if byte == b"#":
            newline = sector.find(b"\n", pos)
            if newline < 0:
                return False
            pos = newline + 1
        elif byte == b" ":
            while pos < len(sector) and sector[pos : pos + 1] == b" ":
                pos += 1
            if sector[pos : pos + 1] == b"\r":
                pos += 1
            if sector[pos : pos + 1] != b"\n":
                return False
            pos += 1
        else:
            line = sector[pos : pos + 11]
            return any(
                line.startswith(b"version=%d%s" % (version, ending))
                for version in (1, 2, 3)
                for ending in (b"\n", b"\r\n")
            )
    return False


def _vmdk(sector: bytes) -> bool:
    if sector[:4] in (b"COWD", b"KDMV"):
        return True
    return _vmdk_descriptor(sector)


def _parallels(sector: bytes) -> bool:
    return sector[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and _le32(sector, 16) == 2


def _bochs(sector: bytes) -> bool:
    return (
        sector[:23] == b"Bochs Virtual HD Image\0"
        and sector[32:40] == b"Redolog\0"
        and sector[48:56] == b"Growing\0"
        and _le32(sector, 64) in (0x00020000, 0x00010000)
    )


QEMU_RULES: tuple[Rule, ...] = (
    Rule("qcow2", 'magic "QFI\\xfb" and version >= 2',
         lambda s: s[:4] == QCOW_MAGIC and _be32(s, 4) >= 2),
    Rule("qcow", 'magic "QFI\\xfb" and version 1',
         lambda s: s[:4] == QCOW_MAGIC and _be32(s, 4) == 1),
    Rule("vmdk", 'magic "COWD"/"KDMV" or a "version=1|2|3" text descriptor', _vmdk),
    Rule("vdi", "signature 0xbeda107f at offset 64", lambda s: s[64:68] == VDI_SIGNATURE),
    Rule("vpc", 'cookie "conectix"', lambda s: s[:8] == b"conectix"),
    Rule("vhdx", 'signature "vhdxfile"', lambda s: s[:8] == b"vhdxfile"),
    Rule("qed", 'magic "QED\\0"', lambda s: s[:4] == b"QED\0"),
    Rule("parallels", "parallels magic and version 2", _parallels),
    Rule("bochs", "bochs growing redolog header", _bochs),
    Rule("luks", 'magic "LUKS\\xba\\xbe" and version 1',
         lambda s: s[:6] == LUKS_MAGIC and _be16(s, 6) == 1),
    Rule("cloop", "cloop V2.0 shell preamble", lambda s: s[: len(CLOOP_PREFIX)] == CLOOP_PREFIX),
)  # fmt: skip

STRICT_EXTRA_RULES: tuple[Rule, ...] = (
    Rule("qcow", 'libvirt: "QFI" and version 1', lambda s: s[:3] == b"QFI" and _be32(s, 4) == 1),
    Rule("qcow2", 'libvirt: "QFI" and version 2 or 3',
         lambda s: s[:3] == b"QFI" and _be32(s, 4) in (2, 3)),
    Rule("qed", 'libvirt: "QED"', lambda s: s[:3] == b"QED"),
    Rule("vmdk", 'libvirt: "KDMV" and version 1-3',
         lambda s: s[:4] == b"KDMV" and _le32(s, 4) in (1, 2, 3)),
    Rule("vpc", 'libvirt: "conectix" and version 0x00010000',
         lambda s: s[:8] == b"conectix" and _be32(s, 12) == 0x00010000),
    Rule("vdi", "libvirt: vdi signature and version 1.1",
         lambda s: s[64:68] == VDI_SIGNATURE and _le32(s, 68) == 0x00010001),
    Rule("ploop", 'libvirt: "WithouFreSpacExt"', lambda s: s[:16] == b"WithouFreSpacExt"),
    Rule("cow", 'libvirt: "OOOM" and version 2', lambda s: s[:4] == b"OOOM" and _be32(s, 4) == 2),
    Rule("luks", 'libvirt: "LUKS\\xba\\xbe" and version 1',
         lambda s: s[:6] == LUKS_MAGIC and _be16(s, 6) == 1),
    Rule("qcow2", 'OpenBSD vmd: "QFI\\xfb", any version', lambda s: s[:4] == QCOW_MAGIC),
)  # fmt: skip

RULE_SETS: Mapping[str, tuple[Rule, ...]] = {
    "qemu": QEMU_RULES,
    "strict": QEMU_RULES + STRICT_EXTRA_RULES,
}


def normalize_sector(sector: bytes | bytearray | memoryview) -> bytes:
    """Exactly 512 bytes: longer input is cut, shorter zero-filled (as QEMU reads past EOF)."""
    data = bytes(sector[:SECTOR])
    return data + bytes(SECTOR - len(data)) if len(data) < SECTOR else data


def detect_header(
    sector: bytes | bytearray | memoryview,
    rule_set: str,
    allowed: frozenset[str] = frozenset(),
) -> str | None:
    """The format of the first rule in `rule_set` the sector matches, skipping `allowed`
    formats; None when no prober would take the sector for a formatted image."""
    rules = RULE_SETS.get(rule_set)
    if rules is None:
        raise ValueError(f"unknown rule set {rule_set!r} (choose from {RULE_SET_NAMES})")
    data = normalize_sector(sector)
    for rule in rules:
        if rule.format not in allowed and rule.matches(data):
            return rule.format
    return None
