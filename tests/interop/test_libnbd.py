"""Every command, flag and error code through libnbd (the library behind nbdsh)."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.interop.conftest import RunningServer

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.interop


def connect(
    server: RunningServer,
    export: str,
    transport: str = "unix",
    *,
    structured: bool = True,
    meta: bool = True,
    strict: bool = False,
) -> nbd.NBD:
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)  # let the server, not libnbd, judge bad requests
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(server.uri(export, transport))
    return h


@pytest.fixture
def h(server: RunningServer, transport: str) -> Iterator[nbd.NBD]:
    handle = connect(server, "vm1", transport)
    yield handle
    handle.shutdown()


def errno_of(call: object, *args: object, **kwargs: object) -> int | None:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except nbd.Error as err:
        code = err.errno  # libnbd 1.14 reports the name ("EINVAL"), newer ones the number
        return int(getattr(errno, code)) if isinstance(code, str) else code
    return None


def test_negotiated_capabilities(h: nbd.NBD) -> None:
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context("base:allocation")
    for capability in (
        h.can_flush,
        h.can_fua,
        h.can_trim,
        h.can_zero,
        h.can_fast_zero,
        h.can_cache,
        h.can_df,
        h.can_multi_conn,
    ):
        assert capability(), capability.__name__
    assert not h.is_read_only()
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096


def test_flush_makes_bytes_visible_in_file(server: RunningServer, h: nbd.NBD) -> None:
    h.pwrite(b"durable!" * 64, 4096)
    h.flush()
    assert server.images["vm1"].read_bytes()[4096:4608] == b"durable!" * 64


def test_fua_write(server: RunningServer, h: nbd.NBD) -> None:
    h.pwrite(b"F" * 4096, 8192, nbd.CMD_FLAG_FUA)
    assert server.images["vm1"].read_bytes()[8192 : 8192 + 4096] == b"F" * 4096


def test_trim_and_write_zeroes(server: RunningServer, h: nbd.NBD) -> None:
    h.pwrite(b"\x77" * (1 << 20), 0)
    h.trim(65536, 0, nbd.CMD_FLAG_FUA)
    h.zero(65536, 65536)
    h.zero(65536, 131072, nbd.CMD_FLAG_NO_HOLE)
    h.zero(65536, 196608, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4 * 65536 - 65536, 65536) == bytes(4 * 65536 - 65536)
    assert h.pread(65536, 4 * 65536) == b"\x77" * 65536
    h.flush()
    data = server.images["vm1"].read_bytes()
    assert data[65536 : 4 * 65536] == bytes(3 * 65536)


def test_cache(h: nbd.NBD) -> None:
    h.cache(1 << 20, 0)


def extents(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []

    def callback(context: str, start: int, entries: list[int], err: int) -> int:
        assert context == "base:allocation" and start == offset
        found.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(count, offset, callback, flags)
    return found


def test_block_status(h: nbd.NBD) -> None:
    h.pwrite(b"\x01" * 65536, 1 << 20)
    found = extents(h, 4 << 20, 0)
    assert found[0] == (1 << 20, 3)
    assert found[1] == (65536, 0)
    assert sum(length for length, _ in found) == 4 << 20
    one = extents(h, 4 << 20, 0, nbd.CMD_FLAG_REQ_ONE)
    assert one == [(1 << 20, 3)]


def read_chunks(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
    """Chunks as (offset, length, status); callbacks must not raise inside libnbd."""
    chunks: list[tuple[int, int, int]] = []

    def chunk(data: bytes, start: int, status: int, error: int) -> int:
        chunks.append((start, len(data), status))
        return 0

    buf = h.pread_structured(count, offset, chunk, flags)
    assert buf == h.pread(count, offset)
    return sorted(chunks)


def test_structured_sparse_read_and_df(h: nbd.NBD) -> None:
    h.pwrite(b"\x42" * 65536, 2 << 20)
    chunks = read_chunks(h, 1 << 20, (2 << 20) - (512 << 10))
    kinds = {status for _, _, status in chunks}
    assert kinds == {nbd.READ_DATA, nbd.READ_HOLE}
    assert sum(length for _, length, _ in chunks) == 1 << 20
    df = read_chunks(h, 1 << 20, (2 << 20) - (512 << 10), nbd.CMD_FLAG_DF)
    assert len(df) == 1
    for start, length, status in chunks:
        expected = b"\x42" if start >= 2 << 20 else b"\0"
        if status == nbd.READ_DATA:
            assert h.pread(length, start) == expected * length
    hole = read_chunks(h, 1 << 20, 8 << 20, nbd.CMD_FLAG_DF)
    assert [status for _, _, status in hole] == [nbd.READ_HOLE]


def test_error_codes(server: RunningServer, transport: str) -> None:
    h = connect(server, "vm1", transport)
    size = h.get_size()
    assert errno_of(h.pread, 512, size) == errno.EINVAL
    assert errno_of(h.pwrite, b"x" * 512, size) == errno.ENOSPC
    assert errno_of(h.zero, 512, size) == errno.ENOSPC
    assert errno_of(h.trim, 512, size) == errno.EINVAL
    assert errno_of(h.pread, (32 << 20) + 512, 0) in (errno.EOVERFLOW, errno.EINVAL)
    h.pwrite(b"ok", 0)  # the connection is still usable after every error
    h.shutdown()
    ro = connect(server, "ro", transport)
    assert ro.is_read_only()
    assert errno_of(ro.pwrite, b"x" * 512, 0) == errno.EPERM
    assert errno_of(ro.trim, 512, 0) == errno.EPERM
    assert errno_of(ro.zero, 512, 0) == errno.EPERM
    assert ro.pread(4096, 0) == b"\x5a" * 4096
    ro.flush()
    ro.shutdown()
    assert server.images["ro"].read_bytes()[:4096] == b"\x5a" * 4096


def test_simple_replies_path(server: RunningServer, transport: str) -> None:
    """The kernel client never negotiates structured replies: the simple path must be complete."""
    h = connect(server, "vm1", transport, structured=False, meta=False)
    assert not h.get_structured_replies_negotiated() and not h.can_df()
    h.pwrite(b"s" * 65536, 0)
    assert h.pread(65536, 0) == b"s" * 65536
    assert errno_of(h.pread, 512, h.get_size()) == errno.EINVAL
    h.zero(4096, 0)
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


def wait_all(h: nbd.NBD) -> None:
    while h.aio_in_flight() > 0:
        h.poll(-1)


def test_many_requests_in_flight(h: nbd.NBD) -> None:
    writes = [nbd.Buffer.from_bytearray(bytearray([i]) * 4096) for i in range(64)]
    cookies = [h.aio_pwrite(buf, i * 4096) for i, buf in enumerate(writes)]
    assert h.aio_in_flight() > 1
    wait_all(h)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    reads = [nbd.Buffer(4096) for _ in range(64)]
    cookies = [h.aio_pread(buf, i * 4096) for i, buf in enumerate(reads)]
    wait_all(h)
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    for i, buf in enumerate(reads):
        assert buf.to_bytearray() == bytearray([i]) * 4096


def test_multi_conn_writes_visible_across_connections(server: RunningServer) -> None:
    a = connect(server, "vm1")
    b = connect(server, "vm1")
    a.pwrite(b"multi" * 100, 12345)
    a.flush()
    assert b.pread(500, 12345) == b"multi" * 100
    a.shutdown()
    b.shutdown()


def test_client_dropping_mid_write_leaves_server_serving(server: RunningServer) -> None:
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(server.socket_path))
    raw.recv(18)
    raw.sendall(struct.pack(">I", 3))
    name = b"vm1"
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    raw.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(go)) + go)
    raw.recv(4096)
    header = struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 1 << 20)
    raw.sendall(header + b"\xcc" * 1000)  # then vanish mid-payload
    raw.close()
    h = connect(server, "vm1")
    h.pwrite(b"alive", 0)
    assert h.pread(5, 0) == b"alive"
    h.shutdown()
    assert server.images["vm1"].read_bytes()[5:1000] != b"\xcc" * 995


def test_abort_and_plain_close_during_handshake(server: RunningServer) -> None:
    for ending in ("abort", "close"):
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(server.socket_path))
        raw.recv(18)
        raw.sendall(struct.pack(">I", 3))
        if ending == "abort":
            raw.sendall(struct.pack(">QII", 0x49484156454F5054, 2, 0))
            reply = raw.recv(20)
            assert struct.unpack(">QIII", reply)[2] == 1  # ACK
        raw.close()
    h = connect(server, "vm1")
    assert h.get_size() == 64 << 20
    h.shutdown()


def test_unknown_export_fails_cleanly(server: RunningServer) -> None:
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(server.uri("does-not-exist"))
