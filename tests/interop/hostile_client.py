"""A client that behaves as an attacker would: it negotiates by hand, then sends every
request in one burst (libnbd sends them one at a time, as a polite client does), and only
then reads the replies. Run as a process, so its work does not share the test's GIL:

    python -m tests.interop.hostile_client SOCKET EXPORT COMMAND COUNT OFFSET LENGTH \
        [FLAGS [WAIT]] [--hold] [--read N] [--connections N] [--tls-ca FILE] \
        [--expect FILE [--stride S] [--span W]]

WAIT is how many seconds to sleep, requests sent, before reading a single reply; --hold
prints "sent" and waits for a line on standard input instead (the caller ends the attack).
--read reads only the first N replies of each connection, then closes it.
--connections opens N sessions and sends the burst on each before reading any of them.
--tls-ca upgrades each session with STARTTLS, trusting that CA (server name: --tls-name).
--expect checks READ replies against FILE, a raw image with the export's content: request
i reads at OFFSET + (i * S) % W (W = 0: no wrap), and every data chunk must equal FILE
there, every hole chunk must be zeroes there, and the chunks must cover LENGTH.

It prints one line: the number of replies, the number of error replies, and the fewest and
most extents seen in a BLOCK_STATUS reply (0 0 for other commands). A reply that fails
--expect ends it with an AssertionError (exit status 1) that says which and why.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from nbdguard.protocol.constants import ChunkType, Option, OptionReply
from tests.protocol.nbdwire import OPT_REPLY, info_payload, meta_payload, option, request

SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
CHUNK_DONE = 1
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR_BIT = 1 << 15
CHUNK_HEADER = struct.Struct(">HHQI")  # after the magic: flags, type, cookie, length


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return bytes(data)


def recv_into_exactly(sock: socket.socket, target: memoryview) -> None:
    """Fill `target` in place: a multi-GiB drain copies nothing more than the kernel does."""
    done = 0
    while done < len(target):
        count = sock.recv_into(target[done:])
        if not count:
            raise ConnectionError("server closed the connection")
        done += count


def _option_replies(sock: socket.socket) -> list[int]:
    kinds = []
    while True:
        _, _, kind, length = OPT_REPLY.unpack(recv_exactly(sock, OPT_REPLY.size))
        recv_exactly(sock, length)
        kinds.append(kind)
        if kind == OptionReply.ACK or kind >= 1 << 31:
            return kinds


def open_session(
    path: str,
    export: str,
    context: ssl.SSLContext | None = None,
    server_hostname: str = "localhost",
) -> socket.socket:
    """Fixed newstyle with structured replies and base:allocation, ending in transmission;
    with a `context`, STARTTLS first and every later option inside TLS."""
    sock: socket.socket = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    if context is not None:
        sock.sendall(option(Option.STARTTLS))
        assert _option_replies(sock)[-1] == OptionReply.ACK, "STARTTLS refused"
        sock = context.wrap_socket(sock, server_hostname=server_hostname)
    sock.sendall(option(Option.STRUCTURED_REPLY))
    assert _option_replies(sock)[-1] == OptionReply.ACK
    sock.sendall(option(Option.SET_META_CONTEXT, meta_payload(export, "base:allocation")))
    assert _option_replies(sock)[-1] == OptionReply.ACK
    sock.sendall(option(Option.GO, info_payload(export)))
    assert _option_replies(sock)[-1] == OptionReply.ACK
    return sock


@dataclass
class Expected:
    """What READ replies must hold: request `cookie` read `length` bytes at `offset_of`
    of `reference`, an open raw image with the export's content."""

    reference: int
    offset: int
    length: int
    stride: int = 0
    span: int = 0
    covered: dict[int, int] = field(default_factory=dict)  # bytes seen per cookie so far
    _buffers: dict[int, tuple[bytearray, bytearray]] = field(default_factory=dict)

    def offset_of(self, cookie: int) -> int:
        step = cookie * self.stride
        return self.offset + (step % self.span if self.span else step)

    def buffers(self, size: int) -> tuple[bytearray, bytearray]:
        """A received-data and a reference buffer of exactly `size` (reused: chunks come in
        few sizes), so the comparison is one memcmp of two bytearrays."""
        if size not in self._buffers:
            self._buffers[size] = (bytearray(size), bytearray(size))
        return self._buffers[size]

    def place(self, cookie: int, offset: int, size: int) -> None:
        """Check that a chunk lies inside its request and count it as covered."""
        start = self.offset_of(cookie)
        assert start <= offset and offset + size <= start + self.length, (
            f"reply {cookie}: chunk {offset}+{size} outside its request {start}+{self.length}"
        )
        self.covered[cookie] = self.covered.get(cookie, 0) + size

    def data(self, sock: socket.socket, cookie: int, size: int) -> None:
        offset = struct.unpack(">Q", recv_exactly(sock, 8))[0]
        got, want = self.buffers(size - 8)
        recv_into_exactly(sock, memoryview(got))
        self.place(cookie, offset, len(got))
        assert os.preadv(self.reference, [want], offset) == len(want), "reference too short"
        assert got == want, f"reply {cookie}: data at {offset}+{len(got)} is not the image's"

    def hole(self, sock: socket.socket, cookie: int) -> None:
        offset, size = struct.unpack(">QI", recv_exactly(sock, 12))
        self.place(cookie, offset, size)
        _, want = self.buffers(size)
        os.preadv(self.reference, [want], offset)
        assert want == bytes(size), f"reply {cookie}: hole at {offset}+{size} is not zeroes"

    def done(self, cookie: int, failed: bool) -> None:
        covered = self.covered.pop(cookie, 0)
        assert failed or covered == self.length, (
            f"reply {cookie}: {covered} bytes of {self.length} came"
        )


def _drain(sock: socket.socket, size: int, scratch: bytearray) -> None:
    view = memoryview(scratch)
    while size:
        piece = min(size, len(scratch))
        recv_into_exactly(sock, view[:piece])
        size -= piece


def read_replies(
    sock: socket.socket, count: int, expect: Expected | None = None
) -> tuple[int, int, int, int]:
    """Read `count` replies: (replies, error replies, fewest and most extents seen)."""
    done = errors = 0
    fewest, most = 1 << 62, 0
    scratch = bytearray(1 << 20)
    failed: set[int] = set()  # cookies with an error chunk so far
    while done < count:
        magic = struct.unpack(">I", recv_exactly(sock, 4))[0]
        if magic == SIMPLE_MAGIC:
            error, _ = struct.unpack(">IQ", recv_exactly(sock, 12))
            done, errors = done + 1, errors + bool(error)
            continue
        assert magic == STRUCTURED_MAGIC, hex(magic)
        flags, kind, cookie, length = CHUNK_HEADER.unpack(recv_exactly(sock, CHUNK_HEADER.size))
        if expect is not None and kind == ChunkType.OFFSET_DATA:
            expect.data(sock, cookie, length)
        elif expect is not None and kind == ChunkType.OFFSET_HOLE:
            expect.hole(sock, cookie)
        else:
            _drain(sock, length, scratch)
        if kind == CHUNK_BLOCK_STATUS:
            extents = (length - 4) // 8
            fewest, most = min(fewest, extents), max(most, extents)
        if kind & CHUNK_ERROR_BIT:
            failed.add(cookie)
        if flags & CHUNK_DONE:
            errors += cookie in failed
            done += 1
            if expect is not None:
                expect.done(cookie, cookie in failed)
            failed.discard(cookie)
    return done, errors, (fewest if most else 0), most


def _send(sock: socket.socket, burst: bytes) -> None:
    """A sender thread's work; the main thread may close the socket first (--read)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(burst)


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hostile_client", description=__doc__)
    for name in ("socket", "export", "command", "count", "offset", "length"):
        parser.add_argument(name, type=str if name in ("socket", "export") else int)
    parser.add_argument("flags", type=int, nargs="?", default=0)
    parser.add_argument("wait", type=float, nargs="?", default=0.0)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--read", type=int)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-name", default="localhost")
    parser.add_argument("--expect")
    parser.add_argument("--stride", type=int, default=0)
    parser.add_argument("--span", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = _arguments(argv)
    context = ssl.create_default_context(cafile=args.tls_ca) if args.tls_ca else None
    sockets = [
        open_session(args.socket, args.export, context, args.tls_name)
        for _ in range(args.connections)
    ]
    reference = os.open(args.expect, os.O_RDONLY) if args.expect else -1
    shape = Expected(reference, args.offset, args.length, args.stride, args.span)
    burst = b"".join(
        request(args.command, shape.offset_of(i), args.length, flags=args.flags, cookie=i)
        for i in range(args.count)
    )
    # Sent from threads: a server that stops reading a client over its budget would
    # otherwise block a sendall while nothing here reads the replies. Under TLS the burst
    # goes from this thread, before any read: an SSL object is not for two threads at once,
    # and a burst of a few hundred requests fits in the socket's buffers.
    senders = [threading.Thread(target=_send, args=(sock, burst)) for sock in sockets]
    for sock, sender in zip(sockets, senders, strict=True):
        if context is None:
            sender.start()
        else:
            sock.sendall(burst)
    if args.wait or args.hold:
        print("sent", flush=True)
    if args.hold:
        sys.stdin.readline()
    else:
        time.sleep(args.wait)
    wanted = args.count if args.read is None else min(args.read, args.count)
    done = errors = most = 0
    fewest = 1 << 62
    for sock in sockets:
        expect = None
        if args.expect:
            expect = Expected(reference, args.offset, args.length, args.stride, args.span)
        counts = read_replies(sock, wanted, expect)
        done, errors = done + counts[0], errors + counts[1]
        if counts[3]:
            fewest, most = min(fewest, counts[2]), max(most, counts[3])
    for sock, sender in zip(sockets, senders, strict=True):
        if wanted < args.count:  # a sender the server stopped reading would block forever
            sock.shutdown(socket.SHUT_RDWR)
        if context is None:
            sender.join()
        sock.close()
    print(done, errors, fewest if most else 0, most)


if __name__ == "__main__":
    main(sys.argv[1:])
