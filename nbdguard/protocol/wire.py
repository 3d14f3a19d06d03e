"""Pure encoders for everything the server sends, and the structs it parses.

Structs are compiled once; encoders return small `bytes` headers so that payloads
(memoryviews of the image) can travel next to them without being copied.
"""

import struct
from collections.abc import Iterable

from nbdguard.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC_OPTION,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    HandshakeFlag,
    Info,
    OptionReply,
    ReplyFlag,
)

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")  # chunk header + offset of an OFFSET_DATA chunk
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
OFFSET = struct.Struct(">Q")
HOLE = struct.Struct(">QI")
ERROR_BODY = struct.Struct(">IH")
EXTENT = struct.Struct(">II")

ZEROES_124 = bytes(124)


def greeting() -> bytes:
    flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: OptionReply, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC_OPTION, option, reply, len(payload)) + payload


def server_entry(name: bytes, description: bytes) -> bytes:
    """Payload of an NBD_REP_SERVER reply to NBD_OPT_LIST."""
    return U32.pack(len(name)) + name + description


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_string(kind: Info, text: bytes) -> bytes:
    return U16.pack(kind) + text


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def meta_context(context_id: int, name: bytes) -> bytes:
    return U32.pack(context_id) + name


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    body = EXPORT_NAME_REPLY.pack(size, flags)
    return body if no_zeroes else body + ZEROES_124


def simple_reply(cookie: int, error: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ChunkType.OFFSET_DATA)


def chunk_header(cookie: int, kind: ChunkType, length: int, done: bool) -> bytes:
    flags = _DONE if done else 0
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header plus offset of an OFFSET_DATA chunk; the data itself follows separately.
    (Plain ints and one pack: this runs once per read.)"""
    flags = _DONE if done else 0
    return DATA_CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie, 8 + length, offset
    )


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk_header(cookie, ChunkType.OFFSET_HOLE, HOLE.size, done) + HOLE.pack(offset, length)


def none_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, ChunkType.NONE, 0, True)


def error_chunk(
    cookie: int, error: int, message: str, offset: int | None = None, *, done: bool = True
) -> bytes:
    text = message.encode()[:4096]
    body = ERROR_BODY.pack(error, len(text)) + text
    kind = ChunkType.ERROR
    if offset is not None:
        body += OFFSET.pack(offset)
        kind = ChunkType.ERROR_OFFSET
    return chunk_header(cookie, kind, len(body), done) + body


def block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], done: bool
) -> bytes:
    body = bytearray(U32.pack(context_id))
    for length, flags in extents:
        body += EXTENT.pack(length, flags)
    return chunk_header(cookie, ChunkType.BLOCK_STATUS, len(body), done) + bytes(body)
