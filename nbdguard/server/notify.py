"""systemd's service notification protocol (sd_notify), in a few lines of stdlib.

Under `Type=notify` systemd starts clients only after READY=1, so it must be sent once every
listener accepts and every export is open; STOPPING=1 and RELOADING=1 show the drain and a
SIGHUP reload in `systemctl status`. Each message is one datagram to `$NOTIFY_SOCKET` (a path,
or an abstract socket when it starts with '@'). Without that variable nothing is sent.
A failure to notify is never fatal, and never blocks: the socket is non-blocking.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send `fields` ("KEY=value") as one datagram; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a transport we do not speak (vsock:)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """RELOADING=1 with the monotonic time, as systemd (253+) wants for a reload."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping: draining connections")
