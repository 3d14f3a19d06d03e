"""What a client should connect to (`serve --print-uri`), and captive serving (`serve --run`):
serve, run one command against the server, stop when it exits, exit with its status — as
nbdkit's `--run`, so a script needs no background process, pid file or cleanup of its own."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from urllib.parse import quote

from nbdguard.config import ListenAddress
from nbdguard.server.app import Server

SHELL = "/bin/sh"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class ClientAddress:
    uri: str
    unix_socket: str  # "" when the URI is TCP


def client_address(address: ListenAddress, export: str, bound_port: int) -> ClientAddress:
    """The NBD URI (as libnbd and qemu parse it) of `export` behind one listener. A wildcard
    host becomes the loopback address: a URI names where to connect, not what was bound."""
    name = quote(export, safe="")
    if address.scheme == "unix":
        socket_query = quote(address.path, safe="/")
        return ClientAddress(f"nbd+unix:///{name}?socket={socket_query}", address.path)
    host = _WILDCARDS.get(address.host, address.host)
    shown = f"[{host}]" if ":" in host else host
    return ClientAddress(f"nbd://{shown}:{bound_port}/{name}", "")


def server_address(server: Server, export: str) -> ClientAddress:
    """The first configured listener's URI, with the port actually bound (`:0` asks for any)."""
    address = server.config.server.listen[0]
    port = address.port
    if address.scheme == "tcp" and port == 0:
        # The bound port is only known to the listener; Server keeps them in start order.
        port = int(server._listeners[0].sockets[0].getsockname()[1])
    return client_address(address, export, port)


def exit_status(returncode: int) -> int:
    """A shell's convention for a command killed by a signal: 128 + the signal number."""
    return 128 - returncode if returncode < 0 else returncode


async def run_captive(server: Server, command: str, address: ClientAddress) -> int:
    """Run `command` under /bin/sh with $uri, $nbd and $unixsocket set, serving meanwhile.
    Its exit stops the server (gracefully: in-flight work is flushed); a signal that stops
    the server first terminates the command. Returns the command's exit status."""
    env = {**os.environ, "uri": address.uri, "nbd": address.uri, "unixsocket": address.unix_socket}
    process = await asyncio.create_subprocess_exec(SHELL, "-c", command, env=env)
    serving = asyncio.ensure_future(server.serve())
    finished = asyncio.ensure_future(process.wait())
    await asyncio.wait({serving, finished}, return_when=asyncio.FIRST_COMPLETED)
    if finished.done():
        server.log.info("server.stopping", reason="run_exited", status=process.returncode)
        # The same stop a first SIGTERM asks for (Server.serve waits on it).
        server._stop.set()
    else:
        process.send_signal(signal.SIGTERM)
    try:
        await serving
    finally:
        await finished
    return exit_status(finished.result())
