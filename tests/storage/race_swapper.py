"""Swap two directory entries with renameat2(RENAME_EXCHANGE), as fast as possible, until
SIGTERM; then print how many swaps were made. A process of its own, so the swaps run
truly in parallel with the opens under test (a thread would take turns with them on the
GIL). Prints "ready" once the first swaps are done.

    python -m tests.storage.race_swapper PATH_A PATH_B
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import sys
from types import FrameType

AT_FDCWD = -100
RENAME_EXCHANGE = 2
SYS_RENAMEAT2_X86_64 = 316

_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: bytes, b: bytes) -> None:
    """Atomically swap two names: at every instant each name exists."""
    if platform.machine() == "x86_64":
        result = _libc.syscall(SYS_RENAMEAT2_X86_64, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    else:
        result = _libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    if result:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def main(argv: list[str]) -> None:
    a, b = os.fsencode(argv[0]), os.fsencode(argv[1])
    swaps = 0

    def stop(signum: int, frame: FrameType | None) -> None:
        print(swaps, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    for _ in range(1000):
        exchange(a, b)
        swaps += 1
    print("ready", flush=True)
    while True:
        exchange(a, b)
        swaps += 1


if __name__ == "__main__":
    main(sys.argv[1:])
