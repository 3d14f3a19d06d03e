"""Open the listening sockets named in the config (TCP over IPv4/IPv6, Unix)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from nbdguard.config import ListenAddress
from nbdguard.errors import NbdguardError

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


@dataclass(frozen=True, slots=True)
class SocketFile:
    """A Unix socket file this server bound, by identity: at close it is removed only if
    the path still names that very file (another server may have taken the path since)."""

    path: str
    dev: int
    ino: int


@dataclass(frozen=True, slots=True)
class Listener:
    server: asyncio.Server
    socket_file: SocketFile | None = None  # None: TCP


async def listen(
    address: ListenAddress, factory: ProtocolFactory, *, socket_mode: int = 0o660
) -> Listener:
    """Listen on a configured address; a Unix socket gets `socket_mode`, whatever the umask."""
    loop = asyncio.get_running_loop()
    try:
        if address.scheme == "unix":
            sock, socket_file = _bind_unix(Path(address.path), socket_mode)
            try:
                server = await loop.create_unix_server(factory, sock=sock)
            except BaseException:
                sock.close()
                remove_socket_file(socket_file)
                raise
            return Listener(server, socket_file)
        server = await loop.create_server(factory, address.host, address.port, reuse_address=True)
        return Listener(server)
    except OSError as err:
        raise NbdguardError(f"cannot listen on {address}: {err.strerror or err}") from err


def _bind_unix(path: Path, mode: int) -> tuple[socket.socket, SocketFile]:
    """Bind with a umask that lets nobody in, then set `mode` on the file bound: there is no
    moment where a permissive umask (000) leaves the socket open to every local user."""
    _clear_stale_socket(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        previous = os.umask(0o777)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous)
        return sock, _own_socket_file(path, mode)
    except BaseException:
        sock.close()
        raise


def _own_socket_file(path: Path, mode: int) -> SocketFile:
    """Record the bound file's identity and chmod that same inode (through an O_PATH
    descriptor: a symlink swapped in meanwhile is neither followed nor recorded)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode):
            raise NbdguardError(f"cannot listen on unix://{path}: replaced while binding")
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        except FileNotFoundError:  # no /proc mounted: by name, a moment after the check
            os.chmod(path, mode)
    finally:
        os.close(fd)
    return SocketFile(str(path), info.st_dev, info.st_ino)


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


def remove_socket_file(socket_file: SocketFile) -> bool:
    """Unlink a socket file we bound if the path still names it; False if it is gone or is
    now someone else's (a later server's socket must survive our exit)."""
    try:
        info = os.lstat(socket_file.path)
    except FileNotFoundError:
        return False
    if (info.st_dev, info.st_ino) != (socket_file.dev, socket_file.ino):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_file.path)
    return True


SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 64  # far more than any socket unit passes; beyond it the value is garbage
_SERVABLE_FAMILIES = {socket.AF_INET: "TCP", socket.AF_INET6: "TCP", socket.AF_UNIX: "Unix"}


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_FDS/LISTEN_PID).

    The variables are removed once read, so that nothing we start inherits them. Every
    descriptor is checked before it is served: a bad one is an NbdguardError naming it.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    value = env.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    count = _listen_fds_count(value)
    sockets: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            sockets.append(_inherited_socket(fd))
    except BaseException:
        for sock in sockets:
            sock.detach()  # a refused start leaves the descriptors as they were passed
        raise
    return sockets


def _listen_fds_count(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise NbdguardError(f"socket activation: LISTEN_FDS={value!r} is not a number")
    count = int(value)
    if count > MAX_LISTEN_FDS:
        raise NbdguardError(
            f"socket activation: LISTEN_FDS={value} is more than {MAX_LISTEN_FDS} descriptors"
        )
    return count


def _inherited_socket(fd: int) -> socket.socket:
    where = f"socket activation: descriptor {fd}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        raise NbdguardError(f"{where} is not open ({err.strerror})") from err
    if not stat.S_ISSOCK(mode):
        raise NbdguardError(f"{where} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        _check_servable(sock, where)
    except BaseException:
        sock.detach()
        raise
    os.set_inheritable(fd, False)
    return sock


def _check_servable(sock: socket.socket, where: str) -> None:
    """A listening stream socket, TCP or Unix, bound to an address of its owner's choosing
    (an unbound one would be served on every interface, on a random port)."""
    kind = _SERVABLE_FAMILIES.get(sock.family)
    if kind is None:
        raise NbdguardError(f"{where} is an {sock.family.name} socket, not TCP or Unix")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
        what = "UDP" if kind == "TCP" else "datagram"
        raise NbdguardError(f"{where} is a {what} socket; NBD needs a stream socket")
    name = sock.getsockname()
    if (kind == "TCP" and name[1] == 0) or (kind == "Unix" and not name):
        raise NbdguardError(f"{where} is not bound to an address")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise NbdguardError(f"{where} is not listening (listen() was not called on it)")


async def listen_on(sock: socket.socket, factory: ProtocolFactory) -> asyncio.Server:
    """Serve on an already bound and listening socket (socket activation)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        return await loop.create_unix_server(factory, sock=sock)
    return await loop.create_server(factory, sock=sock)
