"""Listening sockets: the Unix socket's mode is set whatever the umask, only the socket file
we bound is removed, and descriptors passed by socket activation are checked before use."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdguard.config import parse_listen_address
from nbdguard.errors import NbdguardError
from nbdguard.server import listeners


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    yield
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def listen_unix(path: Path, **kwargs: int) -> listeners.Listener:
    address = parse_listen_address(f"unix://{path}", path.parent)
    return await listeners.listen(address, asyncio.Protocol, **kwargs)


async def close(listener: listeners.Listener) -> None:
    listener.server.close()
    await listener.server.wait_closed()
    if listener.socket_file is not None:
        listeners.remove_socket_file(listener.socket_file)


@pytest.mark.parametrize(("kwargs", "expected"), [({}, 0o660), ({"socket_mode": 0o600}, 0o600)])
async def test_socket_mode_is_set_whatever_the_umask(
    tmp_path: Path,
    open_umask: None,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, int],
    expected: int,
) -> None:
    seen_at_bind: list[int] = []
    own = listeners._own_socket_file

    def spy(path: Path, mode: int) -> listeners.SocketFile:
        seen_at_bind.append(mode_of(path))
        return own(path, mode)

    monkeypatch.setattr(listeners, "_own_socket_file", spy)
    path = tmp_path / "s.sock"
    listener = await listen_unix(path, **kwargs)
    try:
        assert mode_of(path) == expected
        assert seen_at_bind == [0]  # between bind and chmod nobody could connect
        assert os.umask(0) == 0  # the process umask is given back
    finally:
        await close(listener)


async def test_close_removes_the_socket_it_bound(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = await listen_unix(path)
    listener.server.close()
    await listener.server.wait_closed()
    assert listener.socket_file is not None
    assert listeners.remove_socket_file(listener.socket_file)
    assert not path.exists()


async def test_a_socket_that_replaced_ours_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = await listen_unix(path)
    path.unlink()  # someone removed it, and another server bound the path since
    second = await listen_unix(path)
    assert first.socket_file is not None
    assert not listeners.remove_socket_file(first.socket_file)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # the second server is still reachable
    first.server.close()
    await close(second)
    assert not path.exists()


async def test_a_live_socket_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = await listen_unix(path)
    with pytest.raises(NbdguardError, match="another server is using it"):
        await listen_unix(path)
    assert first.socket_file is not None
    assert (os.lstat(path).st_ino, os.lstat(path).st_dev) == (
        first.socket_file.ino,
        first.socket_file.dev,
    )
    await close(first)


async def test_tcp_listener_has_no_socket_file() -> None:
    address = parse_listen_address("tcp://127.0.0.1:0", Path("/"))
    listener = await listeners.listen(address, asyncio.Protocol)
    assert listener.socket_file is None
    await close(listener)


# -- socket activation ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "x", "-1", "1.0", "٣", " 1", "65", str(1 << 70)])
def test_bad_listen_fds_values_are_refused(value: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": value}
    with pytest.raises(NbdguardError, match="LISTEN_FDS"):
        listeners.inherited_sockets(env)
    assert env == {}  # read once: nothing started later inherits them


def test_listen_fds_for_another_process_is_ignored() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "x"}
    assert listeners.inherited_sockets(env) == []


def test_zero_listen_fds_is_no_sockets() -> None:
    assert listeners.inherited_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


def refused(fd: int) -> str:
    with pytest.raises(NbdguardError) as raised:
        listeners._inherited_socket(fd)
    return str(raised.value)


def test_a_closed_descriptor_is_refused() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    assert "is not open" in refused(fd)


def test_a_file_is_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        assert "is not a socket" in refused(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("family", "kind", "bind", "message"),
    [
        (socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0), "is a UDP socket"),
        (socket.AF_UNIX, socket.SOCK_DGRAM, None, "is a datagram socket"),
        (socket.AF_INET, socket.SOCK_STREAM, None, "is not bound"),
        (socket.AF_INET6, socket.SOCK_STREAM, None, "is not bound"),
        (socket.AF_UNIX, socket.SOCK_STREAM, None, "is not bound"),
        (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0), "is not listening"),
    ],
)
def test_unservable_sockets_are_refused_and_left_open(
    family: int, kind: int, bind: tuple[str, int] | None, message: str
) -> None:
    with socket.socket(family, kind) as sock:
        if bind is not None:
            sock.bind(bind)
        assert message in refused(sock.fileno())
        sock.getsockname()  # still open: the descriptor is left as it was passed


def test_a_netlink_socket_is_refused() -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW) as sock:
        assert "not TCP or Unix" in refused(sock.fileno())


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
def test_a_bound_listening_stream_socket_is_accepted(tmp_path: Path, family: int) -> None:
    with socket.socket(family) as sock:
        sock.bind(("127.0.0.1", 0) if family == socket.AF_INET else str(tmp_path / "a.sock"))
        sock.listen()
        accepted = listeners._inherited_socket(sock.fileno())
        assert accepted.fileno() == sock.fileno() and not os.get_inheritable(sock.fileno())
        accepted.detach()
