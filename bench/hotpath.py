"""Per-request cost of nbdguard's own code, without sockets or clients.

Frames a stream of requests the way a client would send them, feeds it through the
parser in receive-sized pieces (as the transport does) and serves every request
against a raw export on a file in the page cache; replies are discarded. What is left
is the Python path (parse, validate, dispatch, layers, metrics, reply encoding) plus
the pread/pwrite system calls, in microseconds per request. Stable to a few percent,
unlike the end-to-end runs, so it is the tool for A/B testing hot-path changes.

    .venv/bin/python -m bench.hotpath
    .venv/bin/python -m bench.hotpath --requests 200000 --guard off
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from nbdguard.config import ExportConfig
from nbdguard.observability.metrics import Metrics
from nbdguard.protocol.constants import BASE_ALLOCATION_ID, REQUEST_MAGIC, Command
from nbdguard.protocol.transmission import RequestParser
from nbdguard.protocol.validate import SessionLimits
from nbdguard.server.dispatch import Dispatcher
from nbdguard.server.exports import open_export

SIZE = 256 << 20
RECEIVE = 208 * 1024  # what one receive typically delivers (the client's socket buffer)
REQUEST = struct.Struct(">IHHQQI")
KINDS = {
    "read-4k": (Command.READ, 4096),
    "write-4k": (Command.WRITE, 4096),
    "read-64k": (Command.READ, 65536),
    "write-64k": (Command.WRITE, 65536),
}


class Replies:
    """Counts replies and drops them, as a transport does once they are sent."""

    def __init__(self) -> None:
        self.count = 0

    def send(self, pieces: Sequence[Any]) -> None:
        self.count += 1


def stream(command: int, length: int, count: int) -> bytes:
    payload = os.urandom(length) if command == Command.WRITE else b""
    pieces = []
    for cookie in range(count):
        offset = random.randrange(1, SIZE // length) * length  # never sector 0
        pieces.append(REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length))
        pieces.append(payload)
    return b"".join(pieces)


def serve(dispatcher: Dispatcher, data: bytes) -> None:
    parser = RequestParser()
    source = memoryview(data)
    while source:
        target = parser.get_buffer()
        count = min(len(target), len(source), RECEIVE)
        target[:count] = source[:count]
        source = source[count:]
        for event in parser.buffer_updated(count):
            dispatcher.receive(event)


def measure(kind: str, requests: int, guard: str, metrics: bool) -> float:
    command, length = KINDS[kind]
    with tempfile.TemporaryDirectory(prefix="nbdguard-hotpath-") as tmp:
        image = Path(tmp) / "d.raw"
        with open(image, "wb") as handle:
            chunk = os.urandom(1 << 20)
            for _ in range(SIZE >> 20):
                handle.write(chunk)
        config = ExportConfig(name="d", path=image, format="raw", header_guard=guard)  # type: ignore[arg-type]
        export = open_export(config, Metrics().for_export("d", per_request=metrics))
        limits = SessionLimits(SIZE, False, True, True, 32 << 20)
        replies = Replies()
        dispatcher = Dispatcher(
            export, limits, (BASE_ALLOCATION_ID,), replies.send, structlog.get_logger()
        )
        data = stream(command, length, requests)
        serve(dispatcher, data[: len(data) // 10])  # warm the page cache and code
        replies.count = 0
        start = time.perf_counter()
        serve(dispatcher, data)
        elapsed = time.perf_counter() - start
        assert replies.count == requests
        export.close()
    return elapsed / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guard", default="qemu", choices=["qemu", "strict", "off"])
    parser.add_argument("--no-metrics", action="store_true")
    args = parser.parse_args(argv)
    for kind in args.kinds:
        times = [
            measure(kind, args.requests, args.guard, not args.no_metrics)
            for _ in range(args.rounds)
        ]
        print(f"{kind:10} {min(times):6.2f} us/request (best of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
