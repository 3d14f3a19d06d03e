"""Client-side encoders/decoders used by the protocol tests (a tiny test client)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from nbdguard.protocol.constants import IHAVEOPT, REPLY_MAGIC_OPTION, REQUEST_MAGIC
from nbdguard.protocol.transmission import Event, RequestParser

OPT_REPLY = struct.Struct(">QIII")


def option(code: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload


def info_payload(name: str, *infos: int) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
    return body + b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name: str, *queries: str) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        q = query.encode()
        body += struct.pack(">I", len(q)) + q
    return body


def request(
    command: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)


@dataclass
class OptReply:
    option: int
    reply: int
    payload: bytes


def parse_option_replies(data: bytes) -> list[OptReply]:
    replies = []
    pos = 0
    while pos < len(data):
        magic, opt, kind, length = OPT_REPLY.unpack_from(data, pos)
        assert magic == REPLY_MAGIC_OPTION, hex(magic)
        pos += OPT_REPLY.size
        replies.append(OptReply(opt, kind, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return replies


def receive_in_pieces(
    parser: RequestParser, data: bytes, chunk: int | None = None
) -> Iterator[list[Event]]:
    """Feed `data` through get_buffer/buffer_updated as asyncio does, at most `chunk` bytes
    per receive, yielding each receive's completed requests: serve them before asking for
    the next batch (payload views are only valid until the next get_buffer)."""
    source = memoryview(data)
    while source:
        target = parser.get_buffer()
        count = min(len(target), len(source), chunk or len(source))
        target[:count] = source[:count]
        source = source[count:]
        yield parser.buffer_updated(count)
