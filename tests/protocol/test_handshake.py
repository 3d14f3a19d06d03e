"""Drive the sans-I/O handshake with raw bytes: no sockets."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdguard.protocol.constants import (
    ALLOCATION_DEPTH_ID,
    BASE_ALLOCATION_ID,
    IHAVEOPT,
    NBDMAGIC,
    Info,
    Option,
    OptionReply,
)
from nbdguard.protocol.constants import TransmissionFlag as TF
from nbdguard.protocol.handshake import (
    Handshake,
    HandshakeClosed,
    HandshakeDone,
    HandshakeLimits,
    StartTls,
)
from tests.protocol.conftest import Directory
from tests.protocol.nbdwire import (
    info_payload,
    meta_payload,
    option,
    parse_option_replies,
    request,
)

CLIENT_FLAGS = struct.pack(">I", 3)  # fixed newstyle + no zeroes


def start(directory: Directory, **limits: int) -> Handshake:
    hs = Handshake(directory, HandshakeLimits(**limits) if limits else None)
    greeting = hs.data_to_send()
    assert greeting == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert hs.receive(CLIENT_FLAGS) is None
    return hs


def replies(hs: Handshake) -> list:
    return parse_option_replies(hs.data_to_send())


def test_list_returns_every_export_then_ack(directory: Directory) -> None:
    hs = start(directory)
    assert hs.receive(option(Option.LIST)) is None
    out = replies(hs)
    assert [r.reply for r in out] == [OptionReply.SERVER, OptionReply.SERVER, OptionReply.ACK]
    names = {r.payload[4 : 4 + struct.unpack(">I", r.payload[:4])[0]] for r in out[:2]}
    assert names == {b"vm1", b""}
    assert out[0].payload.endswith(b"web disk")


def test_list_with_data_is_invalid(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(Option.LIST, b"x"))
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_INVALID]


def test_info_always_sends_export_info_and_block_size(directory: Directory) -> None:
    hs = start(directory)
    assert hs.receive(option(Option.INFO, info_payload("vm1"))) is None
    out = replies(hs)
    kinds = [struct.unpack(">H", r.payload[:2])[0] for r in out if r.reply == OptionReply.INFO]
    assert kinds == [Info.EXPORT, Info.BLOCK_SIZE]
    assert out[-1].reply == OptionReply.ACK
    _, size, flags = struct.unpack(">HQH", out[0].payload)
    assert size == 1 << 20
    assert not flags & TF.SEND_DF  # no structured replies negotiated
    assert struct.unpack(">HIII", out[1].payload)[1:] == (1, 4096, 32 << 20)


def test_go_with_name_and_description(directory: Directory) -> None:
    hs = start(directory)
    done = hs.receive(option(Option.GO, info_payload("vm1", Info.NAME, Info.DESCRIPTION)))
    assert isinstance(done, HandshakeDone)
    out = replies(hs)
    infos = {struct.unpack(">H", r.payload[:2])[0]: r.payload[2:] for r in out[:-1]}
    assert infos[Info.NAME] == b"vm1"
    assert infos[Info.DESCRIPTION] == b"web disk"
    assert done.export.name == "vm1" and not done.structured_replies


def test_go_unknown_export_is_err_unknown_and_session_continues(directory: Directory) -> None:
    hs = start(directory)
    assert hs.receive(option(Option.GO, info_payload("nope"))) is None
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_UNKNOWN]
    assert isinstance(hs.receive(option(Option.GO, info_payload(""))), HandshakeDone)


def test_truncated_and_trailing_info_payloads_are_invalid(directory: Directory) -> None:
    hs = start(directory)
    good = info_payload("vm1", Info.NAME)
    hs.receive(option(Option.INFO, good[:-1]))
    hs.receive(option(Option.INFO, good + b"\0"))
    hs.receive(option(Option.INFO, struct.pack(">I", 1000) + b"vm1"))
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_INVALID] * 3


def test_export_name_sends_size_flags_and_honours_no_zeroes(directory: Directory) -> None:
    hs = Handshake(directory)
    hs.data_to_send()
    hs.receive(struct.pack(">I", 1))  # fixed newstyle, zeroes wanted
    done = hs.receive(option(Option.EXPORT_NAME, b"vm1"))
    assert isinstance(done, HandshakeDone)
    out = hs.data_to_send()
    assert len(out) == 8 + 2 + 124 and out[10:] == bytes(124)
    assert struct.unpack(">QH", out[:10])[0] == 1 << 20
    hs2 = start(directory)
    hs2.receive(option(Option.EXPORT_NAME, b""))
    assert len(hs2.data_to_send()) == 10


def test_export_name_unknown_closes(directory: Directory) -> None:
    hs = start(directory)
    event = hs.receive(option(Option.EXPORT_NAME, b"missing"))
    assert isinstance(event, HandshakeClosed) and not event.clean


def test_abort_is_acked_and_clean(directory: Directory) -> None:
    hs = start(directory)
    event = hs.receive(option(Option.ABORT))
    assert isinstance(event, HandshakeClosed) and event.clean
    assert [r.reply for r in replies(hs)] == [OptionReply.ACK]


def test_unknown_option_is_unsup_and_session_continues(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(0xDEAD, b"abc") + option(Option.STARTTLS) + option(Option.PEEK_EXPORT))
    unsup, policy = OptionReply.ERR_UNSUP, OptionReply.ERR_POLICY  # no TLS configured
    assert [r.reply for r in replies(hs)] == [unsup, policy, unsup]
    assert isinstance(hs.receive(option(Option.GO, info_payload("vm1"))), HandshakeDone)


def start_tls_mode(directory: Directory, mode: str) -> Handshake:
    hs = Handshake(directory, tls_mode=mode)
    hs.data_to_send()
    assert hs.receive(CLIENT_FLAGS) is None
    return hs


def test_require_mode_allows_only_starttls_and_abort(directory: Directory) -> None:
    hs = start_tls_mode(directory, "require")
    for opt in (Option.LIST, Option.STRUCTURED_REPLY, 0xDEAD):
        hs.receive(option(opt))
    hs.receive(option(Option.GO, info_payload("vm1")))
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_TLS_REQD] * 4
    event = hs.receive(option(Option.EXPORT_NAME, b"vm1"))
    assert isinstance(event, HandshakeClosed) and event.code == "tls_required"
    aborting = start_tls_mode(directory, "require")
    closed = aborting.receive(option(Option.ABORT))
    assert isinstance(closed, HandshakeClosed) and closed.clean


def test_starttls_resets_negotiated_state(directory: Directory) -> None:
    hs = start_tls_mode(directory, "on")
    hs.receive(option(Option.STRUCTURED_REPLY))
    hs.receive(option(Option.SET_META_CONTEXT, meta_payload("vm1", "base:allocation")))
    event = hs.receive(option(Option.STARTTLS))
    assert isinstance(event, StartTls)
    assert [r.reply for r in replies(hs)][-1] == OptionReply.ACK
    hs.tls_established()
    assert hs.tls
    done = hs.receive(option(Option.GO, info_payload("vm1")))
    assert isinstance(done, HandshakeDone)
    assert not done.structured_replies and done.meta_contexts == ()


def test_after_tls_nothing_answers_tls_required(directory: Directory) -> None:
    hs = start_tls_mode(directory, "require")
    assert isinstance(hs.receive(option(Option.STARTTLS)), StartTls)
    hs.tls_established()
    hs.data_to_send()
    hs.receive(option(Option.STARTTLS) + option(Option.LIST))
    out = [r.reply for r in replies(hs)]
    assert out[0] == OptionReply.ERR_INVALID  # a second STARTTLS
    assert OptionReply.ERR_TLS_REQD not in out and out[-1] == OptionReply.ACK


def test_starttls_with_data_or_bytes_behind_it(directory: Directory) -> None:
    hs = start_tls_mode(directory, "on")
    hs.receive(option(Option.STARTTLS, b"x"))
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_INVALID]
    event = hs.receive(option(Option.STARTTLS) + b"\x16\x03\x01")  # not waiting for the ACK
    assert isinstance(event, HandshakeClosed) and event.code == "tls"


def test_bad_option_magic_closes(directory: Directory) -> None:
    hs = start(directory)
    event = hs.receive(struct.pack(">QII", 0x1234, Option.LIST, 0))
    assert isinstance(event, HandshakeClosed) and not event.clean


def test_unknown_client_flags_close(directory: Directory) -> None:
    hs = Handshake(directory)
    event = hs.receive(struct.pack(">I", 1 << 7))
    assert isinstance(event, HandshakeClosed)


def test_option_flood_is_bounded(directory: Directory) -> None:
    hs = start(directory, max_options=10)
    event = hs.receive(option(Option.LIST) * 11)
    assert isinstance(event, HandshakeClosed) and "too many" in event.reason
    assert len(replies(hs)) == 10 * 3


def test_oversized_option_is_skipped_without_buffering(directory: Directory) -> None:
    hs = start(directory, max_option_length=1024)
    header = struct.pack(">QII", IHAVEOPT, Option.GO, 8 << 20)
    assert hs.receive(header) is None
    chunk = bytes(64 * 1024)
    for _ in range(128):
        assert hs.receive(chunk) is None
        assert len(hs._state.buffer) == 0  # streamed past, never accumulated
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_TOO_BIG]
    assert isinstance(hs.receive(option(Option.GO, info_payload("vm1"))), HandshakeDone)


def test_structured_reply_twice_is_invalid_and_enables_df(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(Option.STRUCTURED_REPLY) + option(Option.STRUCTURED_REPLY))
    assert [r.reply for r in replies(hs)] == [OptionReply.ACK, OptionReply.ERR_INVALID]
    done = hs.receive(option(Option.GO, info_payload("vm1")))
    assert isinstance(done, HandshakeDone) and done.structured_replies
    assert done.flags & TF.SEND_DF


def test_set_meta_context_requires_structured_replies(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(Option.SET_META_CONTEXT, meta_payload("vm1", "base:allocation")))
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_INVALID]


def test_meta_contexts_list_and_set(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(Option.STRUCTURED_REPLY))
    hs.data_to_send()
    hs.receive(option(Option.LIST_META_CONTEXT, meta_payload("vm1")))
    hs.receive(option(Option.LIST_META_CONTEXT, meta_payload("vm1", "base:")))
    hs.receive(option(Option.LIST_META_CONTEXT, meta_payload("vm1", "qemu:")))
    hs.receive(option(Option.LIST_META_CONTEXT, meta_payload("vm1", "qemu:dirty-bitmap:x")))
    out = replies(hs)
    assert [r.reply for r in out] == [
        OptionReply.META_CONTEXT,
        OptionReply.META_CONTEXT,
        OptionReply.ACK,
        OptionReply.META_CONTEXT,
        OptionReply.ACK,
        OptionReply.META_CONTEXT,
        OptionReply.ACK,
        OptionReply.ACK,
    ]
    assert out[0].payload == struct.pack(">I", 0) + b"base:allocation"
    assert out[1].payload == struct.pack(">I", 0) + b"qemu:allocation-depth"
    assert out[3].payload == struct.pack(">I", 0) + b"base:allocation"
    assert out[5].payload == struct.pack(">I", 0) + b"qemu:allocation-depth"
    hs.receive(option(Option.SET_META_CONTEXT, meta_payload("vm1", "x-foo:bar", "base:allocation")))
    out = replies(hs)
    assert out[0].payload == struct.pack(">I", BASE_ALLOCATION_ID) + b"base:allocation"
    done = hs.receive(option(Option.GO, info_payload("vm1")))
    assert isinstance(done, HandshakeDone) and done.meta_contexts == (BASE_ALLOCATION_ID,)


def test_both_contexts_can_be_selected_in_query_order(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(Option.STRUCTURED_REPLY))
    hs.data_to_send()
    queries = ("qemu:allocation-depth", "base:allocation", "base:allocation")
    hs.receive(option(Option.SET_META_CONTEXT, meta_payload("vm1", *queries)))
    out = replies(hs)
    assert [r.reply for r in out] == [OptionReply.META_CONTEXT] * 2 + [OptionReply.ACK]
    assert out[0].payload == struct.pack(">I", ALLOCATION_DEPTH_ID) + b"qemu:allocation-depth"
    done = hs.receive(option(Option.GO, info_payload("vm1")))
    assert isinstance(done, HandshakeDone)
    assert done.meta_contexts == (ALLOCATION_DEPTH_ID, BASE_ALLOCATION_ID)


def test_go_for_another_export_drops_contexts(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(Option.STRUCTURED_REPLY))
    hs.receive(option(Option.SET_META_CONTEXT, meta_payload("vm1", "base:allocation")))
    done = hs.receive(option(Option.GO, info_payload("")))
    assert isinstance(done, HandshakeDone) and done.meta_contexts == ()


def test_meta_query_without_namespace_is_invalid(directory: Directory) -> None:
    hs = start(directory)
    hs.receive(option(Option.STRUCTURED_REPLY))
    hs.data_to_send()
    hs.receive(option(Option.SET_META_CONTEXT, meta_payload("vm1", "nocolon")))
    assert [r.reply for r in replies(hs)] == [OptionReply.ERR_INVALID]


def test_bytes_after_go_are_handed_to_transmission(directory: Directory) -> None:
    hs = start(directory)
    tail = request(0, 0, 512)
    done = hs.receive(option(Option.GO, info_payload("vm1")) + tail)
    assert isinstance(done, HandshakeDone) and done.leftover == tail


def test_byte_at_a_time_equals_all_at_once(directory: Directory) -> None:
    stream = (
        option(Option.STRUCTURED_REPLY)
        + option(Option.LIST)
        + option(Option.GO, info_payload("vm1", Info.NAME))
    )
    whole = start(directory)
    done_whole = whole.receive(stream)
    pieces = start(directory)
    done_pieces = None
    for i in range(len(stream)):
        done_pieces = pieces.receive(stream[i : i + 1]) or done_pieces
    assert done_whole == done_pieces
    assert whole.data_to_send() == pieces.data_to_send()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(data: bytes) -> None:
    hs = Handshake(Directory())
    hs.data_to_send()
    event = hs.receive(data)
    assert event is None or isinstance(event, HandshakeClosed | HandshakeDone)
    assert len(hs._state.buffer) <= 16 * 1024 + 64
