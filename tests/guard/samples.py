"""Sector-0 samples: headers every prober detects, and real content none should."""

from __future__ import annotations

import struct


def sector(*parts: tuple[int, bytes]) -> bytes:
    data = bytearray(512)
    for offset, raw in parts:
        data[offset : offset + len(raw)] = raw
    return bytes(data)


CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"

# Detected by QEMU's probes (so by both rule sets).
QEMU_HEADERS: dict[str, bytes] = {
    "qcow2": sector((0, b"QFI\xfb" + struct.pack(">I", 3))),
    "qcow": sector((0, b"QFI\xfb" + struct.pack(">I", 1))),
    "vmdk": sector((0, b"KDMV")),
    "vdi": sector((64, struct.pack("<I", 0xBEDA107F))),
    "vpc": sector((0, b"conectix")),
    "vhdx": sector((0, b"vhdxfile")),
    "qed": sector((0, b"QED\0")),
    "parallels": sector((0, b"WithoutFreeSpace" + struct.pack("<I", 2))),
    "bochs": sector(
        (0, b"Bochs Virtual HD Image\0"),
        (32, b"Redolog\0"),
        (48, b"Growing\0"),
        (64, struct.pack("<I", 0x00020000)),
    ),
    "luks": sector((0, b"LUKS\xba\xbe" + struct.pack(">H", 1))),
    "cloop": sector((0, CLOOP)),
}

MORE_QEMU_HEADERS: dict[str, list[bytes]] = {
    "qcow2": [sector((0, b"QFI\xfb\xff\xff\xff\xff")), sector((0, b"QFI\xfb\0\0\0\x02"))],
    "vmdk": [
        sector((0, b"COWD")),
        sector((0, b"version=1\n")),
        sector((0, b"# Disk DescriptorFile\nversion=1\n")),
        sector((0, b"# a\r\n#b\0\0\nversion=3\r\n")),
        sector((0, b"   \n  \r\nversion=2\n")),
    ],
    "parallels": [sector((0, b"WithouFreSpacExt" + struct.pack("<I", 2)))],
    "bochs": [
        sector(
            (0, b"Bochs Virtual HD Image\0"),
            (32, b"Redolog\0"),
            (48, b"Growing\0"),
            (64, struct.pack("<I", 0x00010000)),
        )
    ],
}

# Detected only by the strict rule set (libvirt and OpenBSD vmd rules).
STRICT_ONLY: dict[str, bytes] = {
    "qcow2": sector((0, b"QFI\xfb")),  # version 0: vmd still calls it qcow2
    "qed": sector((0, b"QED\x01")),
    "ploop": sector((0, b"WithouFreSpacExt" + struct.pack("<I", 1))),
    "cow": sector((0, b"OOOM" + struct.pack(">I", 2))),
}
STRICT_ALSO_QCOW2 = sector((0, b"QFI\x00" + struct.pack(">I", 3)))  # libvirt ignores 0xFB

MBR = sector((446, bytes([0x80, 1, 1, 0, 0x83, 0xFE, 0xFF, 0xFF])), (510, b"\x55\xaa"))
GPT_PROTECTIVE = sector((446, bytes([0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1])), (510, b"\x55\xaa"))
FAT = sector((0, b"\xeb\x3c\x90MSDOS5.0\x00\x02\x08"), (54, b"FAT16   "), (510, b"\x55\xaa"))
NTFS = sector((0, b"\xeb\x52\x90NTFS    "), (510, b"\x55\xaa"))

# Real content and near misses: QEMU's probes detect none of these.
NOT_DETECTED_BY_QEMU: dict[str, bytes] = {
    "zeros": bytes(512),
    "mbr": MBR,
    "gpt-protective-mbr": GPT_PROTECTIVE,
    "fat": FAT,
    "ntfs": NTFS,
    "ext4-sector0": bytes(512),  # the ext superblock lives at 1024
    "qcow-version-0": sector((0, b"QFI\xfb\0\0\0\0")),
    "VMDK": sector((0, b"VMDK")),
    "version=4": sector((0, b"version=4\n")),
    "QED\\x01": sector((0, b"QED\x01")),
    "parallels-v1": sector((0, b"WithoutFreeSpace" + struct.pack("<I", 1))),
    "luks2": sector((0, b"LUKS\xba\xbe" + struct.pack(">H", 2))),
    "truncated-cloop": sector((0, CLOOP[:-1])),
    "OOOM": sector((0, b"OOOM" + struct.pack(">I", 2))),
    "blank-line-then-version": sector((0, b"\nversion=1\n")),
    "tab-line": sector((0, b"\tversion=1\n")),
    "comment-without-newline": sector((0, b"#" + b"x" * 511)),
    "version-at-end": sector((502, b"version=1")),
}
