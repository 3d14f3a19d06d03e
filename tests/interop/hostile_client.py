"""A client that behaves as an attacker would: it negotiates by hand, then sends every
request in one burst (libnbd sends them one at a time, as a polite client does), and only
then reads the replies. Run as a process, so its work does not share the test's GIL:

    python -m tests.interop.hostile_client SOCKET EXPORT COMMAND COUNT OFFSET LENGTH \
        [FLAGS [WAIT]]

WAIT is how many seconds to sleep, requests sent, before reading a single reply.

It prints one line: the number of replies, the number of error replies, and the fewest and
most extents seen in a BLOCK_STATUS reply (0 0 for other commands).
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

from nbdguard.protocol.constants import Option, OptionReply
from tests.protocol.nbdwire import OPT_REPLY, info_payload, meta_payload, option, request

SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
CHUNK_DONE = 1
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR_BIT = 1 << 15


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return bytes(data)


def _option_replies(sock: socket.socket) -> list[int]:
    kinds = []
    while True:
        _, _, kind, length = OPT_REPLY.unpack(recv_exactly(sock, OPT_REPLY.size))
        recv_exactly(sock, length)
        kinds.append(kind)
        if kind == OptionReply.ACK or kind >= 1 << 31:
            return kinds


def open_session(path: str, export: str) -> socket.socket:
    """Fixed newstyle with structured replies and base:allocation, ending in transmission."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    recv_exactly(sock, 18)
    sock.sendall(struct.pack(">I", 3) + option(Option.STRUCTURED_REPLY))
    assert _option_replies(sock)[-1] == OptionReply.ACK
    sock.sendall(option(Option.SET_META_CONTEXT, meta_payload(export, "base:allocation")))
    assert _option_replies(sock)[-1] == OptionReply.ACK
    sock.sendall(option(Option.GO, info_payload(export)))
    assert _option_replies(sock)[-1] == OptionReply.ACK
    return sock


def read_replies(sock: socket.socket, count: int) -> tuple[int, int, int, int]:
    done = errors = 0
    fewest, most = 1 << 62, 0
    while done < count:
        magic = struct.unpack(">I", recv_exactly(sock, 4))[0]
        if magic == SIMPLE_MAGIC:
            error, _ = struct.unpack(">IQ", recv_exactly(sock, 12))
            done, errors = done + 1, errors + bool(error)
            continue
        assert magic == STRUCTURED_MAGIC, hex(magic)
        flags, kind, _, length = struct.unpack(">HHQI", recv_exactly(sock, 16))
        recv_exactly(sock, length)
        if kind == CHUNK_BLOCK_STATUS:
            extents = (length - 4) // 8
            fewest, most = min(fewest, extents), max(most, extents)
        errors += bool(kind & CHUNK_ERROR_BIT)
        done += bool(flags & CHUNK_DONE)
    return done, errors, (fewest if most else 0), most


def main(argv: list[str]) -> None:
    path, export, command, count, offset, length = argv[:6]
    flags = int(argv[6]) if len(argv) > 6 else 0
    wait = float(argv[7]) if len(argv) > 7 else 0.0
    sock = open_session(path, export)
    burst = b"".join(
        request(int(command), int(offset), int(length), flags=flags, cookie=i)
        for i in range(int(count))
    )
    # Sent from a thread: a server that stops reading a client over its budget would
    # otherwise block this sendall while nothing here reads the replies.
    sender = threading.Thread(target=sock.sendall, args=(burst,))
    sender.start()
    if wait:
        print("sent", flush=True)
        time.sleep(wait)
    print(*read_replies(sock, int(count)))
    sender.join()
    sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
