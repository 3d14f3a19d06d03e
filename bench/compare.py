"""Side-by-side NBD server benchmark: nbdguard vs qemu-nbd, nbdkit and nbd-server.

Every server serves its own copy of the same image over a Unix socket; the same fio
(ioengine=nbd) jobs run against each, interleaved A B C D, B C D A, … for several
rounds, and the table reports medians and the ratio nbdguard / peer. Servers are
restarted every round with the image copies rotated among them, because copies of one
file differ in how costly the kernel makes writing to them. Server CPU time per GiB
moved (from /proc) and peak RSS (the largest of any round) are recorded too.

    .venv/bin/python -m bench.compare                 # all jobs, 3 rounds
    .venv/bin/python -m bench.compare --jobs randread-4k seqread-1m --rounds 5
    .venv/bin/python -m bench.compare --image qcow2-overlay   # nbdguard vs qemu-nbd only
    .venv/bin/python -m bench.compare --no-peers --guard --metrics --control --rounds 8

The last form measures the guard's and the metrics' cost: `--control` adds a second,
identical nbdguard, whose ratio to the first shows how far apart two runs of the same
server land on this machine, i.e. what difference the run can resolve at all.

Images: `raw` (default); `qcow2-allocated`, a fully allocated qcow2 (64 KiB clusters) made
by `qemu-img convert`; `qcow2-overlay`, a fresh qcow2 overlay per server over one shared
raw base, so writes exercise allocation and copy-on-write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")

JOBS: dict[str, dict[str, str]] = {
    "seqread-1m": {"rw": "read", "bs": "1M", "iodepth": "8"},
    "seqwrite-1m": {"rw": "write", "bs": "1M", "iodepth": "8"},
    "randread-4k": {"rw": "randread", "bs": "4k", "iodepth": "32"},
    "randwrite-4k": {"rw": "randwrite", "bs": "4k", "iodepth": "32"},
    "randread-4k-4conn": {"rw": "randread", "bs": "4k", "iodepth": "32", "numjobs": "4"},
    "mixed-64k-70-30": {"rw": "randrw", "rwmixread": "70", "bs": "64k", "iodepth": "16"},
}


@dataclass
class Server:
    name: str
    export: str
    socket: Path
    command: list[str]
    pid_file: Path | None = None  # for servers that daemonize (nbd-server)
    cwd: Path | None = None  # where `python -m nbdguard` finds its package (--baseline)
    process: subprocess.Popen[bytes] | None = None
    pid: int = 0

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def start(self, log: Path) -> None:
        for stale in (self.socket, self.pid_file):  # left by the previous round's server
            if stale is not None:
                stale.unlink(missing_ok=True)
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
            )
        deadline = time.monotonic() + 20
        while not self._accepting():
            exited = self.process.poll() is not None and self.pid_file is None
            if exited or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        while self.pid_file is not None and not self.pid_file.exists():
            time.sleep(0.05)
        self.pid = int(self.pid_file.read_text()) if self.pid_file else self.process.pid

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def cpu_seconds(self) -> float:
        """User + system time of the server and of its exited children (forking servers)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:15]) / CLK_TCK

    def memory_mib(self, field_name: str) -> float:
        """A /proc status field: VmHWM is peak RSS (mapped image pages count in it),
        RssAnon the process's own memory."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.pid_file is not None and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def make_image(path: Path, size: int) -> None:
    """A fully allocated image of incompressible data (reads must hit real pages)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as handle:
        for _ in range(size >> 20):
            handle.write(chunk)


IMAGE_KINDS = ("raw", "qcow2-allocated", "qcow2-overlay")


def make_images(work: Path, count: int, kind: str, size: int) -> list[Path]:
    """`count` image files made the same way (one per server); then the page cache settles."""
    source = work / "source.raw"
    make_image(source, size)
    images = []
    for number in range(count):
        if kind == "raw":
            image = work / f"image{number}.raw"
            shutil.copyfile(source, image)
        elif kind == "qcow2-allocated":
            image = work / f"image{number}.qcow2"
            qemu_img("convert", "-O", "qcow2", str(source), str(image))
        else:
            image = work / f"image{number}.qcow2"
            qemu_img("create", "-f", "qcow2", "-b", str(source), "-F", "raw", str(image))
        images.append(image)
    if kind != "qcow2-overlay":
        source.unlink()
    os.sync()
    return images


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def nbdguard_server(
    work: Path,
    image: Path,
    name: str,
    extra: str = "",
    server_extra: str = "",
    *,
    source: Path | None = None,
) -> Server:
    fmt = "raw" if image.suffix == ".raw" else "qcow2"
    sock = work / f"{name}.sock"
    config = work / f"{name}.toml"
    config.write_text(
        f'[server]\nlisten = ["unix://{sock}"]\nlog_level = "warning"\n{server_extra}'
        f'[[exports]]\nname = "disk"\npath = "{image}"\nformat = "{fmt}"\n{extra}'
    )
    command = [sys.executable, "-m", "nbdguard", "serve", "--config", str(config)]
    return Server(name, "disk", sock, command, cwd=source or ROOT)


def peer_servers(work: Path, images: dict[str, Path]) -> list[Server]:
    servers = []
    qemu_format = "raw" if images["qemu-nbd"].suffix == ".raw" else "qcow2"
    if shutil.which("qemu-nbd"):
        sock = work / "qemu-nbd.sock"
        servers.append(
            Server(
                "qemu-nbd",
                "disk",
                sock,
                [
                    "qemu-nbd",
                    "-f",
                    qemu_format,
                    "-x",
                    "disk",
                    "-k",
                    str(sock),
                    "-e",
                    "16",
                    "-t",
                    "--cache=writeback",
                    "--aio=threads",
                    str(images["qemu-nbd"]),
                ],
            )
        )
    if qemu_format != "raw" or "nbdkit" not in images:
        return servers  # nbdkit's and nbd-server's qcow2 support is not comparable
    if shutil.which("nbdkit"):
        sock = work / "nbdkit.sock"
        servers.append(
            Server(
                "nbdkit",
                "disk",
                sock,
                [
                    "nbdkit",
                    "-f",
                    "-U",
                    str(sock),
                    "-e",
                    "disk",
                    "file",
                    f"file={images['nbdkit']}",
                ],
            )
        )
    if shutil.which("nbd-server"):
        sock = work / "nbd-server.sock"
        config = work / "nbd-server.conf"
        config.write_text(
            f"[generic]\nunixsock = {sock}\nmax_threads = 16\n"
            f"[disk]\nexportname = {images['nbd-server']}\nflush = true\nfua = true\n"
        )
        pid_file = work / "nbd-server.pid"
        command = ["nbd-server", "-C", str(config), "-p", str(pid_file)]
        servers.append(Server("nbd-server", "disk", sock, command, pid_file=pid_file))
    return servers


def run_fio(server: Server, job: str, size: str, runtime: int) -> tuple[float, int]:
    """Throughput in MiB/s and bytes moved."""
    params = {
        "ioengine": "nbd",
        "uri": server.uri,
        "size": size,
        "time_based": "1",
        "runtime": str(runtime),
        "group_reporting": "1",
        "direct": "0",
        **JOBS[job],
    }
    args = ["fio", "--output-format=json", f"--name={job}"]
    args += [f"--{key}={value}" for key, value in params.items()]
    result = subprocess.run(
        args, check=False, capture_output=True, text=True, timeout=runtime + 120
    )
    if result.returncode != 0:
        raise RuntimeError(f"fio against {server.name} failed:\n{result.stdout}{result.stderr}")
    report = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    moved = report["read"]["io_bytes"] + report["write"]["io_bytes"]
    return moved / runtime / (1 << 20), moved


COPY_TARGETS = ("file", "null:")  # a real copy; and the server alone (nbdcopy discards)


def nbdcopy_seconds(server: Server, work: Path, target: str) -> float:
    """Seconds for nbdcopy to copy the whole export to a new file, or to `null:`: writing
    the file costs every server the same, so `null:` shows the difference between servers."""
    path = work / "copy.out"
    destination = str(path) if target == "file" else target
    start = time.monotonic()
    process = subprocess.Popen(["nbdcopy", server.uri, destination])
    # A plain wait() blocks in waitpid; wait(timeout) polls at up to 50 ms intervals, which
    # rounded every copy time to a multiple of 0.05 s. The timer is the hang guard instead.
    guard = threading.Timer(600, process.kill)
    guard.start()
    try:
        code = process.wait()
    finally:
        guard.cancel()
    elapsed = time.monotonic() - start
    if code:
        raise subprocess.CalledProcessError(code, process.args)
    path.unlink(missing_ok=True)
    return elapsed


@contextlib.contextmanager
def running(servers: list[Server], work: Path) -> Iterator[None]:
    try:
        for server in servers:
            server.start(work / f"{server.name}.log")
        yield
    finally:
        for server in servers:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--guard", action="store_true", help="also nbdguard with the guard off")
    parser.add_argument(
        "--metrics", action="store_true", help="also nbdguard without per-request metrics"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also a second nbdguard configured exactly like the first: its ratio is the "
        "run's noise floor (an A/A comparison)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also nbdguard from this checkout (e.g. a `git worktree` of an older commit), "
        "as nbdguard-baseline: a change's cost, measured side by side in one run",
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="only nbdguard and its variants (overheads)"
    )
    parser.add_argument("--no-copy", action="store_true", help="skip the nbdcopy timing")
    parser.add_argument("--image", choices=IMAGE_KINDS, default="raw", help="what is served")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nbdguard-bench-") as tmp:
        work = Path(tmp)
        # nbdguard variants: (name, export keys, server keys, source checkout)
        variants: list[tuple[str, str, str, Path | None]] = [("nbdguard", "", "", None)]
        if args.guard:
            variants.append(("nbdguard-noguard", 'header_guard = "off"\n', "", None))
        if args.metrics:
            variants.append(("nbdguard-nometrics", "", "request_metrics = false\n", None))
        if args.control:
            variants.append(("nbdguard-again", "", "", None))
        if args.baseline is not None:
            variants.append(("nbdguard-baseline", "", "", args.baseline.resolve()))
        names = [name for name, _, _, _ in variants]
        if not args.no_peers:
            names += ["qemu-nbd"] + (["nbdkit", "nbd-server"] if args.image == "raw" else [])
        files = make_images(work, len(names), args.image, args.size_mib << 20)
        totals = Totals()
        for round_number in range(args.rounds):
            # Image files rotate between servers every round: copies of one image can differ
            # by tens of percent in the kernel's cost of writing to them (how their page
            # cache happens to be laid out), and that must not stick to one server.
            images = {name: files[(i + round_number) % len(files)] for i, name in enumerate(names)}
            servers = [
                nbdguard_server(work, images[name], name, extra, server_extra, source=source)
                for name, extra, server_extra, source in variants
            ]
            if not args.no_peers:
                servers += peer_servers(work, images)
            # and who goes first rotates too, so no server always follows the same one
            shift = round_number % len(servers)
            with running(servers, work):
                run_round(servers[shift:] + servers[:shift], args, work, totals)
        print(report(names, args, totals))
    return 0


@dataclass
class Totals:
    """Every round's measurements, by server name."""

    throughput: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu_per_gib: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    copy_seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    rss: dict[str, tuple[float, float]] = field(default_factory=dict)  # peak, anon


def run_round(servers: list[Server], args: argparse.Namespace, work: Path, totals: Totals) -> None:
    size = f"{args.size_mib}M"
    for job in args.jobs:
        for server in servers:
            before = server.cpu_seconds()
            mib_s, moved = run_fio(server, job, size, args.runtime)
            cpu = server.cpu_seconds() - before
            totals.throughput.setdefault((server.name, job), []).append(mib_s)
            totals.cpu_per_gib.setdefault((server.name, job), []).append(cpu / (moved / (1 << 30)))
    if not args.no_copy and shutil.which("nbdcopy"):
        for server in servers:
            for target in COPY_TARGETS:
                seconds = nbdcopy_seconds(server, work, target)
                totals.copy_seconds.setdefault((server.name, target), []).append(seconds)
    for server in servers:
        peak, anon = server.memory_mib("VmHWM"), server.memory_mib("RssAnon")
        old_peak, old_anon = totals.rss.get(server.name, (0.0, 0.0))
        totals.rss[server.name] = (max(peak, old_peak), max(anon, old_anon))


def report(names: list[str], args: argparse.Namespace, totals: Totals) -> str:
    ours, peers = names[0], names[1:]
    lines = [
        f"rounds={args.rounds} runtime={args.runtime}s image={args.size_mib} MiB {args.image}; "
        "medians in MiB/s (CPU s/GiB of the server); ratio = nbdguard / peer",
        "",
        "| job | " + " | ".join(names) + " | " + " | ".join(f"÷ {p}" for p in peers) + " |",
        "|---" * (len(names) + len(peers) + 1) + "|",
    ]
    for job in args.jobs:
        medians = {n: statistics.median(totals.throughput[n, job]) for n in names}
        cpu = {n: statistics.median(totals.cpu_per_gib[n, job]) for n in names}
        cells = [f"{medians[n]:.0f} ({cpu[n]:.2f})" for n in names]
        ratios = [f"{medians[ours] / medians[p]:.2f}" for p in peers]
        lines.append(f"| {job} | " + " | ".join(cells + ratios) + " |")
    for target in COPY_TARGETS if totals.copy_seconds else ():
        copies = {n: statistics.median(totals.copy_seconds[n, target]) for n in names}
        cells = [f"{copies[n]:.2f}s" for n in names]
        ratios = [f"{copies[p] / copies[ours]:.2f}" for p in peers]
        label = f"nbdcopy whole disk to {target} (time)"
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    memory = [f"{totals.rss[n][0]:.0f} / {totals.rss[n][1]:.0f}" for n in names]
    lines.append("| peak RSS / anon RSS MiB | " + " | ".join(memory) + " |" + " |" * len(peers))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
