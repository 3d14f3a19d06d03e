"""Does one client's cold read stall another client's hot reads?

A client reads 4 KiB blocks at random from a 16 MiB region that is in the page cache
(iodepth 1, so every request waits for the one before); its latency is measured alone and
then while a second client streams 1 MiB reads from the rest of the image after it has been
evicted from the page cache (every page a disk read, done by whatever system call the server
reads with, on its event loop). Run against nbdguard and qemu-nbd (whose reads run in threads).

    .venv/bin/python -m bench.stall [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.compare import Server, make_image, nbdguard_server, peer_servers

HOT = 16 << 20


def evict(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(image: Path) -> None:
    with open(image, "rb") as handle:
        handle.read(HOT)


def hot_latency(server: Server, seconds: int, size: int, cold: bool) -> dict[str, float]:
    jobs = [
        "--name=hot", f"--uri={server.uri}", "--rw=randread", "--bs=4k", "--iodepth=1",
        f"--size={HOT}", "--time_based", f"--runtime={seconds}",
    ]  # fmt: skip
    if cold:
        jobs += [
            "--name=cold", f"--uri={server.uri}", "--rw=read", "--bs=1M", "--iodepth=8",
            f"--offset={HOT}", f"--size={size - HOT}", "--time_based", f"--runtime={seconds}",
        ]  # fmt: skip
    result = subprocess.run(
        ["fio", "--output-format=json", "--ioengine=nbd", *jobs],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout[result.stdout.index("{") :])
    hot = next(job for job in report["jobs"] if job["jobname"] == "hot")["read"]
    percentiles = hot["clat_ns"]["percentile"]
    return {
        "iops": hot["iops"],
        "p50_us": percentiles["50.000000"] / 1000,
        "p99_us": percentiles["99.000000"] / 1000,
        "max_us": hot["clat_ns"]["max"] / 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    size = args.size_mib << 20
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbdguard-stall-") as tmp:
        work = Path(tmp)
        images = {name: work / f"{name}.raw" for name in ("nbdguard", "qemu-nbd")}
        for image in images.values():
            make_image(image, size)
        servers = [nbdguard_server(work, images["nbdguard"], "nbdguard")]
        servers += [s for s in peer_servers(work, images) if s.name == "qemu-nbd"]
        for server in servers:
            server.start(work / f"{server.name}.log")
            try:
                image = images[server.name]
                for cold in (False, True):
                    evict(image)
                    warm(image)
                    stats = hot_latency(server, args.seconds, size, cold)
                    rows.append((server.name, "with cold streaming" if cold else "alone", stats))
            finally:
                server.stop()
    print("| server | hot client | IOPS | p50 µs | p99 µs | max µs |")
    print("|---|---|---|---|---|---|")
    for name, case, stats in rows:
        print(
            f"| {name} | {case} | {stats['iops']:.0f} | {stats['p50_us']:.0f} | "
            f"{stats['p99_us']:.0f} | {stats['max_us']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
