"""Open the listening sockets named in the config (TCP over IPv4/IPv6, Unix)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from nbdguard.config import ListenAddress
from nbdguard.errors import NbdguardError

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


async def listen(address: ListenAddress, factory: ProtocolFactory) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    try:
        if address.scheme == "unix":
            _clear_stale_socket(Path(address.path))
            Path(address.path).parent.mkdir(parents=True, exist_ok=True)
            return await loop.create_unix_server(factory, address.path)
        return await loop.create_server(factory, address.host, address.port, reuse_address=True)
    except OSError as err:
        raise NbdguardError(f"cannot listen on {address}: {err.strerror or err}") from err


def bound_addresses(server: asyncio.Server) -> list[str]:
    """Human-readable addresses actually bound (ports resolved when 0 was asked)."""
    result = []
    for sock in server.sockets:
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            result.append(f"unix://{name}")
        elif sock.family == socket.AF_INET6:
            result.append(f"tcp://[{name[0]}]:{name[1]}")
        else:
            result.append(f"tcp://{name[0]}:{name[1]}")
    return result


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NbdguardError(f"cannot listen on unix://{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        raise
    finally:
        probe.close()
    raise NbdguardError(f"cannot listen on unix://{path}: another server is using it")


def remove_unix_socket(address: ListenAddress) -> None:
    if address.scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)


SD_LISTEN_FDS_START = 3


def inherited_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_FDS/LISTEN_PID).

    The variables are removed once read, so that nothing we start inherits them.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(env.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


async def listen_on(sock: socket.socket, factory: ProtocolFactory) -> asyncio.Server:
    """Serve on an already bound and listening socket (socket activation)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        return await loop.create_unix_server(factory, sock=sock)
    return await loop.create_server(factory, sock=sock)
