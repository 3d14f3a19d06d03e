"""Memory with many connections: nbdguard serving 64 idle connections while 4 busy ones run
fio (4k random reads, iodepth 32 each), as issue 6 asks. Reports peak RSS (VmHWM), and the
split of the current RSS into anonymous memory (the process's own) and file pages (mapped
files: the interpreter's libraries; image data is read with sendfile/pread, never mapped).

    .venv/bin/python -m bench.connections [--idle 64] [--busy 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

from bench.compare import make_image, nbdguard_server


def status(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=64)
    parser.add_argument("--busy", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nbdguard-conn-") as tmp:
        work = Path(tmp)
        image = work / "disk.raw"
        make_image(image, args.size_mib << 20)
        # 64 connections from one uid: lift the per-client limit, which is not measured here
        server = nbdguard_server(
            work, image, "nbdguard", server_extra="max_connections_per_client = 1000\n"
        )
        server.start(work / "server.log")
        try:
            before = status(server.pid)
            idle = []
            for _ in range(args.idle):
                handle = nbd.NBD()
                handle.connect_uri(server.uri)
                idle.append(handle)
            fio = subprocess.run(
                ["fio", "--name=busy", "--ioengine=nbd", f"--uri={server.uri}",
                 "--rw=randread", "--bs=4k", "--iodepth=32", f"--numjobs={args.busy}",
                 f"--size={args.size_mib}M", "--time_based", f"--runtime={args.seconds}",
                 "--group_reporting"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            time.sleep(0.5)
            after = status(server.pid)
            for handle in idle:
                handle.shutdown()
        finally:
            server.stop()
    bandwidth = next(line for line in fio.stdout.splitlines() if "READ:" in line).strip()
    print(f"{args.idle} idle + {args.busy} busy connections, {args.seconds} s; {bandwidth}")
    print(f"at start: RSS {before['VmRSS']:.0f} MiB (anon {before['RssAnon']:.0f})")
    print(
        f"after:    peak RSS {after['VmHWM']:.0f} MiB; RSS {after['VmRSS']:.0f} MiB = "
        f"anon {after['RssAnon']:.0f} + mapped file pages {after['RssFile']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
