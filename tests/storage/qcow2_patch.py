"""A small qcow2 patcher for hostile-image tests: find the L1, L2 and refcount entries of an
image qemu-img made, read them, and set one to a chosen value (big-endian, in place)."""

from __future__ import annotations

import struct
from pathlib import Path

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63
COMPRESSED = 1 << 62


class Qcow2File:
    def __init__(self, path: Path) -> None:
        self.path = path
        head = path.read_bytes()[:112]
        (_, self.version, _, _, self.cluster_bits, self.size, _, self.l1_size,
         self.l1_offset, self.refcount_table_offset, self.refcount_table_clusters,
         self.nb_snapshots, self.snapshots_offset) = struct.unpack_from(
            ">4sIQIIQIIQQIIQ", head)  # fmt: skip
        self.refcount_order = struct.unpack_from(">I", head, 96)[0] if self.version == 3 else 4
        self.cluster_size = 1 << self.cluster_bits

    def u64(self, offset: int) -> int:
        with self.path.open("rb") as file:
            file.seek(offset)
            return int(struct.unpack(">Q", file.read(8))[0])

    def set_u64(self, offset: int, value: int) -> None:
        with self.path.open("r+b") as file:
            file.seek(offset)
            file.write(struct.pack(">Q", value))

    def l1_entry_at(self, guest_offset: int) -> int:
        """File offset of the L1 entry covering a guest offset."""
        return self.l1_offset + 8 * (guest_offset >> (2 * self.cluster_bits - 3))

    def l2_entry_at(self, guest_offset: int) -> int:
        """File offset of the L2 entry of a guest offset (its L2 table must exist)."""
        table = self.u64(self.l1_entry_at(guest_offset)) & OFFSET_MASK
        assert table, "no L2 table for that offset"
        index = (guest_offset >> self.cluster_bits) & ((self.cluster_size >> 3) - 1)
        return table + 8 * index

    def refcount_entry_at(self, cluster: int) -> tuple[int, int]:
        """(file offset, width in bytes) of a cluster's refcount (8..64-bit refcounts)."""
        width = (1 << self.refcount_order) // 8
        per_block = self.cluster_size // width
        block = self.u64(self.refcount_table_offset + 8 * (cluster // per_block)) & ~0x1FF
        assert block, "no refcount block for that cluster"
        return block + width * (cluster % per_block), width

    def refcount(self, cluster: int) -> int:
        offset, width = self.refcount_entry_at(cluster)
        with self.path.open("rb") as file:
            file.seek(offset)
            return int.from_bytes(file.read(width), "big")

    def set_refcount(self, cluster: int, value: int) -> None:
        offset, width = self.refcount_entry_at(cluster)
        with self.path.open("r+b") as file:
            file.seek(offset)
            file.write(value.to_bytes(width, "big"))
