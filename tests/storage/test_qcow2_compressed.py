"""Inflating one compressed cluster: exactly one cluster of output or EIO, whatever the
stream holds, with bounded work and memory (zlib and zstd)."""

from __future__ import annotations

import errno
import random
import time
import zlib

import pytest
import zstandard

from nbdguard.storage.qcow2.compressed import inflate
from nbdguard.storage.qcow2.header import COMPRESSION_ZSTD

CLUSTER = 65536
ZLIB = 0
CONTENT = random.Random(3).randbytes(4096) * (CLUSTER // 4096)


def deflate(data: bytes, window: int = 12) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -window)
    return compressor.compress(data) + compressor.flush()


def zstd(data: bytes, **params: int) -> bytes:
    parameters = zstandard.ZstdCompressionParameters(**params) if params else None
    return zstandard.ZstdCompressor(compression_params=parameters).compress(data)


def refused(stream: bytes, kind: int, message: str) -> None:
    start = time.process_time()
    with pytest.raises(OSError) as caught:
        inflate(stream, CLUSTER, kind)
    assert time.process_time() - start < 0.05
    assert caught.value.errno == errno.EIO
    assert message in str(caught.value)


@pytest.mark.parametrize("kind", [ZLIB, COMPRESSION_ZSTD])
def test_one_cluster_and_the_bytes_after_it(kind: int) -> None:
    """The sectors read run past the stream: zeros, or the next cluster's stream."""
    make = deflate if kind == ZLIB else zstd
    stream = make(CONTENT)
    for tail in (b"", bytes(511), make(b"\x01" * CLUSTER), b"\xff" * 100):
        assert inflate(stream + tail, CLUSTER, kind) == CONTENT


@pytest.mark.parametrize("kind", [ZLIB, COMPRESSION_ZSTD])
def test_more_than_one_cluster_is_refused(kind: int) -> None:
    make = deflate if kind == ZLIB else zstd
    refused(make(CONTENT + b"\x00"), kind, "past one cluster")  # one byte too many
    refused(make(bytes(256 * CLUSTER)), kind, "past one cluster")  # 16 MiB from a few KiB


def test_zlib_output_held_inside_the_decompressor_counts() -> None:
    """All input consumed with the output full, the rest of a long match still pending."""
    refused(deflate(bytes(CLUSTER + 100)), ZLIB, "past one cluster")


@pytest.mark.parametrize("kind", [ZLIB, COMPRESSION_ZSTD])
def test_short_and_truncated_streams_are_refused(kind: int) -> None:
    make = deflate if kind == ZLIB else zstd
    refused(make(CONTENT[:-1]), kind, "not one cluster")
    stream = make(random.Random(5).randbytes(CLUSTER))
    refused(stream[: len(stream) // 2], kind, "")
    refused(b"", kind, "")


@pytest.mark.parametrize("kind", [ZLIB, COMPRESSION_ZSTD])
def test_garbage_is_refused(kind: int) -> None:
    refused(b"\xff" * 4096, kind, "")


def test_zlib_stream_needing_a_larger_window_is_refused() -> None:
    """QEMU writes raw deflate with a 4 KiB window; a stream reaching further back is bad."""
    data = random.Random(9).randbytes(8192) * (CLUSTER // 8192)
    refused(deflate(data, window=15), ZLIB, "does not decompress")


def test_zstd_frame_asking_for_a_huge_window_is_refused() -> None:
    """Memory is bounded as well as output: a frame may not make us allocate 128 MiB."""
    parameters = zstandard.ZstdCompressionParameters(window_log=27)
    compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj()
    stream = compressor.compress(bytes(CLUSTER)) + compressor.flush()  # size not pledged
    frame = zstandard.get_frame_parameters(stream)
    assert frame.window_size == 1 << 27
    refused(stream, COMPRESSION_ZSTD, "does not decompress")
