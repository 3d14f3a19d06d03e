"""Compressed clusters: where their bytes are and how to inflate them, bounded to one cluster."""

from __future__ import annotations

import errno
import zlib
from dataclasses import dataclass

import zstandard

from nbdguard.storage.qcow2.header import COMPRESSION_ZSTD

SECTOR = 512
ZSTD_WINDOW = 8 << 20  # the largest window a frame may need (QEMU's: one cluster)


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
    """One cluster from its compressed bytes. The output is capped at one cluster whatever
    the stream says (a zip bomb costs one cluster), and a stream that would give more, or
    gives less, or does not decompress is EIO: QEMU only ever writes one cluster's worth.
    Bytes after the stream's end are ignored (the sectors read may hold the next one's)."""
    try:
        if compression_type == COMPRESSION_ZSTD:
            out, more = _zstd(data, cluster_size)
        else:
            out, more = _deflate(data, cluster_size)
    except (zlib.error, zstandard.ZstdError) as err:
        raise OSError(errno.EIO, f"compressed cluster does not decompress: {err}") from err
    if more:
        raise OSError(errno.EIO, "compressed cluster inflates past one cluster")
    if len(out) != cluster_size:
        raise OSError(
            errno.EIO, f"compressed cluster inflates to {len(out)} bytes, not one cluster"
        )
    return out


def _deflate(data: bytes, cluster_size: int) -> tuple[bytes, bool]:
    """(at most one cluster, whether the stream holds more); raw deflate, 4 KiB window."""
    stream = zlib.decompressobj(-12)
    out = stream.decompress(data, cluster_size)
    if stream.eof or len(out) < cluster_size:
        return out, False
    # Full, and the stream has not ended: one more byte tells whether it would go on (it may
    # also be held inside zlib, with all input consumed). A stream that stops exactly at one
    # cluster without its end marker is accepted, as QEMU does.
    return out, bool(stream.decompress(stream.unconsumed_tail, 1))


def _zstd(data: bytes, cluster_size: int) -> tuple[bytes, bool]:
    """(at most one cluster, whether the frame holds more). One read of a cluster and a byte
    stops at the frame's end, before the bytes after it (the sectors read may hold the next
    cluster's frame, or zeros). The window a frame may ask for is capped too: memory, not
    just output, is bounded."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=max(ZSTD_WINDOW, cluster_size))
    with decompressor.stream_reader(data, read_across_frames=False) as reader:
        out = reader.read(cluster_size + 1)
    return out[:cluster_size], len(out) > cluster_size
