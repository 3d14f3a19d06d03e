"""The qcow2 header: parsed and checked whole before any other byte of the image is trusted.

Every limit QEMU applies after CVE-2014-0143..0147 is applied here too, so a hostile header
cannot make the server allocate, seek or loop without bound. Failures are `HeaderError`s
carrying a stable reason label (see `nbdguard.storage.chain`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_EXTENDED_L2_CLUSTER_BITS = 14
MAX_L1_BYTES = 32 << 20
MAX_REFCOUNT_TABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_BACKING_FORMAT = 15
MAX_HOST_OFFSET = (1 << 56) - 1

# incompatible feature bits
DIRTY = 1 << 0
CORRUPT = 1 << 1
DATA_FILE = 1 << 2
COMPRESSION_TYPE = 1 << 3
EXTENDED_L2 = 1 << 4
KNOWN_INCOMPATIBLE = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2
# autoclear feature bits
BITMAPS_CONSISTENT = 1 << 0
RAW_DATA_FILE = 1 << 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXTENSION = struct.Struct(">II")
INCOMPATIBLE_OFFSET = 72
AUTOCLEAR_OFFSET = 88


class HeaderError(Exception):
    """The header is not one nbdguard will open; `reason` is the stable label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int
    compatible: int
    autoclear: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_name: str | None
    backing_format: str | None
    data_file_name: str | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & EXTENDED_L2)

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & DATA_FILE)

    @property
    def compression(self) -> str:
        return COMPRESSION_NAMES[self.compression_type]


def parse_header(data: bytes, file_size: int) -> Qcow2Header:
    """Parse the first cluster of an image (`data` holds at least min(2 MiB, file size)
    bytes from offset 0) and check it against the file's size."""
    if len(data) < V2_HEADER_LENGTH or data[:4] != MAGIC:
        raise HeaderError("bad_header", "not a qcow2 image (no qcow2 magic or truncated header)")
    (_, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size,
     l1_offset, refcount_offset, refcount_clusters, nb_snapshots, snapshots_offset,
     ) = _V2.unpack_from(data)  # fmt: skip
    if version not in (2, 3):
        raise HeaderError("bad_header", f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise HeaderError("bad_header", f"cluster_bits {cluster_bits} outside 9..21")
    cluster_size = 1 << cluster_bits
    if crypt_method != 0:
        raise HeaderError("encrypted", f"encrypted image (crypt_method {crypt_method})")
    incompatible = compatible = autoclear = 0
    refcount_order, header_length, compression_type = 4, V2_HEADER_LENGTH, COMPRESSION_ZLIB
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise HeaderError("bad_header", "truncated version 3 header")
        incompatible, compatible, autoclear, refcount_order, header_length = _V3.unpack_from(
            data, V2_HEADER_LENGTH
        )
        _check_v3(incompatible, refcount_order, header_length, cluster_size, cluster_bits)
        if header_length > V3_HEADER_LENGTH:
            if len(data) < header_length:
                raise HeaderError("bad_header", "truncated header")
            compression_type = data[V3_HEADER_LENGTH]
        _check_compression(incompatible, compression_type)
    if len(data) < min(cluster_size, file_size):
        raise HeaderError("bad_header", "truncated first cluster")
    header = Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=refcount_offset,
        refcount_table_clusters=refcount_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible=incompatible,
        compatible=compatible,
        autoclear=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        backing_name=_backing_name(data, backing_offset, backing_size, cluster_size),
        backing_format=None,
        data_file_name=None,
    )
    _check_tables(header, file_size)
    return _with_extensions(header, header_extensions(data, header))


def header_extensions(data: bytes, header: Qcow2Header) -> dict[int, bytes]:
    """The header extensions (type -> payload) of the first cluster `data` of an image whose
    header is `header`; for readers of those the header does not keep (bitmaps)."""
    backing_offset = _V2.unpack_from(data)[2]
    cluster_size = header.cluster_size
    area_end = backing_offset if backing_offset else cluster_size
    return _extensions(data, header.header_length, min(area_end, cluster_size, len(data)))


def _check_v3(
    incompatible: int, refcount_order: int, header_length: int, cluster_size: int, bits: int
) -> None:
    unknown = incompatible & ~KNOWN_INCOMPATIBLE
    if unknown:
        raise HeaderError("unsupported_feature", f"unknown incompatible feature bits {unknown:#x}")
    if refcount_order > 6:
        raise HeaderError("bad_header", f"refcount_order {refcount_order} above 6")
    if header_length < V3_HEADER_LENGTH or header_length % 8 or header_length > cluster_size:
        raise HeaderError("bad_header", f"invalid header_length {header_length}")
    if incompatible & EXTENDED_L2 and bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise HeaderError("bad_header", "extended L2 entries need clusters of 16 KiB or more")


def _check_compression(incompatible: int, compression_type: int) -> None:
    if compression_type not in COMPRESSION_NAMES:
        raise HeaderError("unsupported_feature", f"unknown compression type {compression_type}")
    if bool(incompatible & COMPRESSION_TYPE) != (compression_type != COMPRESSION_ZLIB):
        raise HeaderError("bad_header", "compression type bit disagrees with compression_type")


def _backing_name(data: bytes, offset: int, size: int, cluster_size: int) -> str | None:
    if offset == 0:
        return None
    if size == 0 or size > MAX_BACKING_NAME or offset + size > min(cluster_size, len(data)):
        raise HeaderError("bad_header", "backing file name is empty, too long or not in cluster 0")
    raw = data[offset : offset + size]
    if b"\0" in raw:
        raise HeaderError("bad_header", "backing file name contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("bad_header", "backing file name is not UTF-8") from None


def _check_table(name: str, offset: int, length: int, cluster_size: int, file_size: int) -> None:
    if offset % cluster_size or (offset == 0 and length):
        raise HeaderError("bad_header", f"{name} offset {offset:#x} is not cluster-aligned")
    if offset > MAX_HOST_OFFSET or offset + length > file_size:
        raise HeaderError("bad_header", f"{name} ({length} bytes at {offset:#x}) is past the end")


def _check_tables(header: Qcow2Header, file_size: int) -> None:
    cluster_size = header.cluster_size
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise HeaderError("bad_header", f"L1 table of {header.l1_size} entries is too large")
    per_l1 = header.l2_entries * cluster_size
    if header.size > header.l1_size * per_l1 or header.size > MAX_HOST_OFFSET:
        raise HeaderError("bad_header", "L1 table too small for the virtual size")
    _check_table("L1 table", header.l1_table_offset, header.l1_size * 8, cluster_size, file_size)
    refcount_bytes = header.refcount_table_clusters * cluster_size
    if header.refcount_table_clusters == 0 or refcount_bytes > MAX_REFCOUNT_TABLE_BYTES:
        raise HeaderError("bad_header", "refcount table is empty or larger than 8 MiB")
    _check_table(
        "refcount table", header.refcount_table_offset, refcount_bytes, cluster_size, file_size
    )
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise HeaderError("bad_header", f"{header.nb_snapshots} snapshots (limit {MAX_SNAPSHOTS})")
    if header.nb_snapshots:
        # Each entry is at least 40 bytes; the table itself is never read (refcounts say
        # what is shared), but it must lie inside the file.
        _check_table(
            "snapshot table",
            header.snapshots_offset,
            header.nb_snapshots * 40,
            cluster_size,
            file_size,
        )


def _extensions(data: bytes, start: int, end: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = start
    while offset + _EXTENSION.size <= end:
        kind, length = _EXTENSION.unpack_from(data, offset)
        if kind == EXT_END:
            break
        offset += _EXTENSION.size
        if length > end - offset:
            raise HeaderError("bad_header", f"header extension {kind:#x} runs past its area")
        if kind in found:
            raise HeaderError("bad_header", f"header extension {kind:#x} appears twice")
        found[kind] = data[offset : offset + length]
        offset += (length + 7) & ~7
    return found


def _text(value: bytes, what: str) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("bad_header", f"{what} is not UTF-8") from None
    if "\0" in text or not text:
        raise HeaderError("bad_header", f"{what} is empty or contains a NUL byte")
    return text


def _with_extensions(header: Qcow2Header, found: dict[int, bytes]) -> Qcow2Header:
    if EXT_CRYPTO in found:
        raise HeaderError("encrypted", "encryption header extension present")
    backing_format = None
    if EXT_BACKING_FORMAT in found:
        value = found[EXT_BACKING_FORMAT]
        if len(value) > MAX_BACKING_FORMAT:
            raise HeaderError("bad_header", "backing format name longer than 15 bytes")
        backing_format = _text(value, "backing format name")
    data_file_name = None
    if EXT_DATA_FILE in found:
        if not header.has_data_file:
            raise HeaderError("bad_header", "data file name without the external data file bit")
        data_file_name = _text(found[EXT_DATA_FILE], "data file name")
        if len(data_file_name.encode()) > MAX_BACKING_NAME:
            raise HeaderError("bad_header", "data file name is too long")
    if header.has_data_file and data_file_name is None:
        raise HeaderError("bad_header", "external data file bit set but no data file name")
    if header.autoclear & RAW_DATA_FILE and not header.has_data_file:
        raise HeaderError("bad_header", "raw external data bit without an external data file")
    return replace(header, backing_format=backing_format, data_file_name=data_file_name)
