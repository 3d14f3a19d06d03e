"""Compressed clusters: where their bytes are and how to inflate them, bounded to one cluster."""

from __future__ import annotations

import errno
import zlib
from dataclasses import dataclass

import zstandard

from nbdguard.storage.qcow2.header import COMPRESSION_ZSTD

SECTOR = 512


@dataclass(frozen=True, slots=True)
class CompressedExtent:
    offset: int  # host byte offset, not aligned
    length: int  # bytes that may hold compressed data


def compressed_extent(entry: int, cluster_bits: int) -> CompressedExtent:
    """Decode a compressed cluster descriptor (L2 entry bits 0..61)."""
    shift = 62 - (cluster_bits - 8)
    offset = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return CompressedExtent(offset, sectors * SECTOR - (offset & (SECTOR - 1)))


def host_clusters(extent: CompressedExtent, cluster_bits: int) -> range:
    """The host clusters the compressed bytes touch (each holds one reference per extent)."""
    first = extent.offset >> cluster_bits
    last = (extent.offset + extent.length - 1) >> cluster_bits
    return range(first, last + 1)


def inflate(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """One cluster from its compressed bytes; anything but exactly one cluster is EIO."""
    try:
        if compression_type == COMPRESSION_ZSTD:
            out = _zstd(data, cluster_size)
        else:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except (zlib.error, zstandard.ZstdError) as err:
        raise OSError(errno.EIO, f"compressed cluster does not decompress: {err}") from err
    if len(out) != cluster_size:
        raise OSError(errno.EIO, "compressed cluster does not inflate to one cluster")
    return out


def _zstd(data: bytes, cluster_size: int) -> bytes:
    # The sectors read may run past the frame into the next cluster's bytes: stop at the
    # frame's end, and never produce more than one cluster.
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
    out = bytearray()
    with reader:
        while len(out) < cluster_size:
            chunk = reader.read(cluster_size - len(out))
            if not chunk:
                break
            out += chunk
    return bytes(out)
