"""How fast can a client rewrite sector 0? A synchronous libnbd loop against nbdguard with
the guard on and off (and, as a baseline, the same loop at offset 4096).

    .venv/bin/python -m bench.sector0_loop --seconds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbd

from bench.compare import Server, nbdguard_server


def ops_per_second(uri: str, offset: int, seconds: float, depth: int) -> float:
    """Writes of 512 bytes at `offset`, `depth` in flight, for `seconds`."""
    h = nbd.NBD()
    h.connect_uri(uri)
    buffers = [nbd.Buffer.from_bytearray(bytearray(os.urandom(512))) for _ in range(depth)]
    done = 0
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        cookies = [h.aio_pwrite(buf, offset) for buf in buffers]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie in cookies:
            h.aio_command_completed(cookie)  # raises if the server refused the write
        done += depth
    elapsed = time.monotonic() - start
    h.shutdown()
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=1, help="requests in flight")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nbdguard-s0-") as tmp:
        work = Path(tmp)
        servers: list[Server] = []
        for name, extra in (("guard-on", ""), ("guard-off", 'header_guard = "off"\n')):
            image = work / f"{name}.raw"
            with open(image, "wb") as handle:
                handle.truncate(64 << 20)
            servers.append(nbdguard_server(work, image, name, extra))
        print(f"512-byte writes, {args.depth} in flight, {args.seconds}s each (ops/s)")
        print("| export | sector 0 | offset 4096 |\n|---|---|---|")
        for server in servers:
            server.start(work / f"{server.name}.log")
            try:
                at0 = ops_per_second(server.uri, 0, args.seconds, args.depth)
                at4k = ops_per_second(server.uri, 4096, args.seconds, args.depth)
            finally:
                server.stop()
            print(f"| {server.name} | {at0:.0f} | {at4k:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
