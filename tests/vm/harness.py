"""Boot a real Linux kernel in a small QEMU VM to drive nbdguard with the kernel's own clients.

The kernel and its modules come from Debian's `linux-image-*-amd64` package; the guest's
userland is an initramfs built here from the host's binaries (busybox-static, nbd-client,
socat, mke2fs, GNU dd and the libraries `ldd` lists). Both are cached under CACHE (outside the
repository, reused between runs), keyed by the kernel package and by this file's contents.

The guest has no IP networking at all: it reaches nbdguard's Unix socket only through
virtio-serial ports, each one a single connection that QEMU opens when it starts.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CACHE = Path(os.environ.get("NBDGUARD_VM_CACHE", "/var/tmp/nbdguard-vm"))
HERE = Path(__file__).resolve()

# Guest binaries: (host path, guest path). Real binaries are called by absolute path in the
# guest because busybox's shell runs its own applets (dd, mke2fs, …) before searching PATH.
BINARIES = {
    "/usr/bin/busybox": "/bin/busybox",
    "/usr/sbin/nbd-client": "/usr/sbin/nbd-client",
    "/usr/bin/socat": "/usr/bin/socat",
    "/usr/sbin/mke2fs": "/usr/sbin/mke2fs",
    "/usr/bin/dd": "/usr/bin/dd",
}
DATA_FILES = {"/etc/mke2fs.conf": "/etc/mke2fs.conf"}
# Loaded with their `depends=`, dependencies first. crc32c_generic is what ext4 asks the
# crypto API for at mount (request_module cannot work: the guest has no modprobe).
MODULES = ("virtio_pci", "virtio_console", "virtio_blk", "nbd", "crc32c_generic", "ext4")


class VMError(AssertionError):
    """The VM could not be built or booted, or the guest script failed."""


# --------------------------------------------------------------------------- kernel


def kernel_package() -> str:
    """The versioned image package that Debian's `linux-image-amd64` currently depends on."""
    out = _run("apt-cache", "depends", "linux-image-amd64").stdout
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", out)
    if not match:
        raise VMError(f"linux-image-amd64 has no linux-image-*-amd64 dependency:\n{out}")
    return match.group(1)


def _run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)
    if result.returncode != 0:
        raise VMError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr}")
    return result


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage whose payload is xz (Debian's choice).

    Under TCG an ELF vmlinux boots through PVH in ~3 s, skipping the slow in-guest
    decompression of the bzImage."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(b"\xfd7zXZ\x00", start + 1)
    raise VMError("no xz-compressed ELF kernel found in the bzImage")


def modinfo(module: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if module[:4] != b"\x7fELF" or module[4] != 2:
        raise VMError("not an ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", module, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from(
            "<IIQQQQ", module, shoff + index * shentsize
        )
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = module.index(b"\0", str_off + name)
        if module[str_off + name : end] == b".modinfo":
            fields = module[offset : offset + size].split(b"\0")
            pairs = (f.decode(errors="replace").partition("=") for f in fields if b"=" in f)
            return {key: value for key, _, value in pairs}
    raise VMError("module has no .modinfo section")


def resolve_modules(index: Mapping[str, Path], wanted: Iterable[str]) -> list[Path]:
    """Module files for `wanted` and all their `depends=`, dependencies first.

    The Debian package ships no modules.dep and the host may have no kmod, so the order
    comes from each module's own .modinfo."""
    order: list[Path] = []
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in path:
            raise VMError(f"module dependency cycle: {' -> '.join((*path, name))}")
        if name not in index:
            raise VMError(f"module {name} not in the kernel package (needed by {path})")
        depends = modinfo(index[name].read_bytes()).get("depends", "")
        for dep in filter(None, depends.split(",")):
            visit(dep, (*path, name))
        done.add(name)
        order.append(index[name])

    for name in wanted:
        visit(name, ())
    return order


# --------------------------------------------------------------------------- initramfs


@dataclass
class Cpio:
    """A cpio "newc" archive, the format the kernel unpacks as an initramfs."""

    data: bytearray = field(default_factory=bytearray)
    inode: int = 1
    dirs: set[str] = field(default_factory=set)

    def _entry(self, name: str, mode: int, body: bytes) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(encoded), 0)
        self.inode += 1
        self.data += b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        self.data += b"\0" * (-len(self.data) % 4) + body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str) -> None:
        parts = Path(name).parts[1:]
        for depth in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:depth])
            if path not in self.dirs:
                self.dirs.add(path)
                self._entry(path, 0o040755, b"")

    def file(self, name: str, body: bytes, mode: int = 0o755) -> None:
        self.directory(str(Path(name).parent))
        self._entry(name, 0o100000 | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self.directory(str(Path(name).parent))
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return bytes(self.data)


def shared_libraries(binary: str) -> list[str]:
    """The libraries (and the loader) that `ldd` says `binary` loads."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    if "not a dynamic executable" in out:
        return []
    return re.findall(r"(?:=>\s*|^\s*)(/\S+)\s+\(0x", out, re.MULTILINE)


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /mnt
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in $(cat /modules.order); do insmod "$module" || echo "insmod $module failed"; done
insmod /lib/modules/nbd.ko nbds_max=4 || echo "insmod nbd.ko failed"
mkdir -p /dev/virtio-ports
for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] && ln -sf "/dev/${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
done
echo "@@BOOTED@@"
sh -e /test.sh
echo "@@RC=$?@@"
sync
reboot -f
"""


def build_initramfs(modules: list[Path]) -> bytes:
    """The guest's base userland; each test appends its /test.sh as a second archive."""
    archive = Cpio()
    for directory in ("/bin", "/usr/bin", "/usr/sbin", "/etc", "/proc", "/sys", "/dev", "/tmp"):
        archive.directory(directory)
    archive.symlink("/sbin", "usr/sbin")
    libraries: set[str] = set()
    for host, guest in BINARIES.items():
        archive.file(guest, Path(host).read_bytes())
        libraries.update(shared_libraries(host))
    for library in sorted(libraries):
        archive.file(library, Path(library).read_bytes())
    for host, guest in DATA_FILES.items():
        archive.file(guest, Path(host).read_bytes(), 0o644)
    order = []
    for module in modules:
        guest = f"/lib/modules/{module.name}"
        archive.file(guest, module.read_bytes(), 0o644)
        if module.name != "nbd.ko":  # loaded with parameters by init
            order.append(guest)
    archive.file("/modules.order", ("\n".join(order) + "\n").encode(), 0o644)
    archive.file("/init", INIT.encode())
    return archive.finish()


def script_archive(script: str, files: Mapping[str, bytes]) -> bytes:
    """A second cpio (the kernel unpacks concatenated archives) with the test's script."""
    archive = Cpio(dirs={"/", "/bin", "/usr", "/usr/bin", "/usr/sbin", "/etc", "/tmp"})
    archive.file("/test.sh", script.encode())
    for name, body in files.items():
        archive.file(name, body, 0o644)
    return archive.finish()


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path


def _fingerprint(package: str) -> str:
    digest = hashlib.sha256(HERE.read_bytes())
    digest.update(package.encode())
    for host in (*BINARIES, *DATA_FILES):
        stat = Path(host).stat()
        digest.update(f"{host}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def guest_image() -> GuestImage:
    """The cached kernel and base initramfs, built on first use (one ~70 MB download)."""
    package = kernel_package()
    target = CACHE / f"{package}-{_fingerprint(package)}"
    image = GuestImage(target / "vmlinux", target / "initramfs.cpio")
    if not (image.kernel.exists() and image.initramfs.exists()):
        _build(package, target)
    os.utime(target)
    _drop_stale(keep=target)
    return image


def _download(package: str, directory: Path) -> Path:
    """The package's .deb; a stale apt index (the mirror dropped that version) is refreshed
    once. A failure raises: CI must not skip silently."""
    try:
        _run("apt-get", "download", package, cwd=directory)
    except VMError:
        _run("apt-get", "update", "-qq")
        _run("apt-get", "download", package, cwd=directory)
    return next(directory.glob("*.deb"))


def _build(package: str, target: Path) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="build-") as scratch:
        work = Path(scratch)
        root = work / "root"
        _run("dpkg-deb", "-x", str(_download(package, work)), str(root))
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        build = work / "out"
        build.mkdir()
        (build / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in root.rglob("*.ko")}
        initramfs = build_initramfs(resolve_modules(index, MODULES))
        (build / "initramfs.cpio").write_bytes(initramfs)
        try:
            build.rename(target)
        except OSError:
            if not (target / "initramfs.cpio").exists():  # not a concurrent run's result
                raise


def _drop_stale(keep: Path, age: float = 3600) -> None:
    """Other kernels or harness versions unused for an hour (concurrent checkouts of other
    versions keep theirs fresh)."""
    for stale in CACHE.glob("linux-image-*"):
        if stale != keep and time.time() - stale.stat().st_mtime > age:
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- QEMU


def accelerator(cpus: int = 1) -> list[str]:
    """KVM where it really works; TCG under kvm_pvm (no hardware virtualization beneath it,
    cannot boot a stock kernel) or without /dev/kvm. One CPU unless a test needs more: each
    TCG vCPU is a busy host thread."""
    if Path("/sys/module/kvm_pvm").exists() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ["-accel", "tcg", "-smp", str(cpus)]
    return ["-accel", "kvm", "-cpu", "host", "-smp", str(cpus)]


@dataclass
class GuestRun:
    console: str
    seconds: float
    returncode: int | None  # the guest script's status; None: it never finished

    def marks(self) -> dict[str, str]:
        """`@@KEY=VALUE@@` lines the guest script printed (the last one wins)."""
        return dict(re.findall(r"@@(\w+)=(.*?)@@", self.console))

    def check(self) -> GuestRun:
        if self.returncode != 0:
            raise VMError(f"guest script exited {self.returncode}:\n{self.console[-6000:]}")
        return self


@dataclass
class VM:
    """A running QEMU; `wait` collects the guest's console once it powers off."""

    process: subprocess.Popen[str]
    console: Path
    started: float = field(default_factory=time.monotonic)

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait(self, timeout: float = 150) -> GuestRun:
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            tail = self.console_text()[-6000:]
            raise VMError(f"VM did not power off within {timeout} s:\n{tail}") from None
        seconds = time.monotonic() - self.started
        text = self.console_text()
        if self.process.returncode != 0:
            raise VMError(f"qemu exited {self.process.returncode}: {stderr}\n{text[-6000:]}")
        match = re.search(r"@@RC=(\d+)@@", text)
        return GuestRun(text, seconds, int(match.group(1)) if match else None)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def start(
    workdir: Path,
    script: str,
    *,
    ports: Mapping[str, Path] = {},
    drives: Iterable[str] = (),
    files: Mapping[str, bytes] = {},
    memory_mb: int = 256,
    cpus: int = 1,
) -> VM:
    """Boot the guest to run `script` (busybox sh -e) as its /test.sh, then power off.

    `ports` maps virtio-serial port names to Unix sockets QEMU connects to when it starts
    (one connection each, for the VM's lifetime); `files` are added to the initramfs."""
    image = guest_image()
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = workdir / "initramfs.cpio"
    with open(initrd, "wb") as out:
        out.write(image.initramfs.read_bytes())
        out.write(script_archive(script, files))
    console = workdir / "console.log"
    command = [
        "qemu-system-x86_64", "-nodefaults", "-nic", "none", "-display", "none",
        "-no-reboot", "-machine", "q35", "-m", str(memory_mb), *accelerator(cpus),
        "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
        "-serial", f"file:{console}",
    ]  # fmt: skip
    if ports:
        command += ["-device", "virtio-serial-pci"]
    for number, (name, socket_path) in enumerate(ports.items()):
        command += [
            "-chardev", f"socket,id=port{number},path={socket_path}",
            "-device", f"virtserialport,chardev=port{number},name={name}",
        ]  # fmt: skip
    for drive in drives:
        command += ["-drive", drive]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return VM(process, console)


def boot(workdir: Path, script: str, *, timeout: float = 150, **options: Any) -> GuestRun:
    """`start` the guest and wait for it to power off."""
    vm = start(workdir, script, **options)
    try:
        return vm.wait(timeout)
    finally:
        vm.kill()


class HostPort:
    """The host's end of one virtio-serial port: a Unix socket listening here, which QEMU
    connects to when it starts. Used as a control channel (lines both ways) or, with
    `relay_to`, as a connection to a server that is started later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.peer: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def accept(self, timeout: float = 60) -> socket.socket:
        self.listener.settimeout(timeout)
        self.peer, _ = self.listener.accept()
        self.peer.settimeout(timeout)
        return self.peer

    def read_line(self, reader: IO[str]) -> str:
        line = reader.readline()
        if not line:
            raise VMError(f"{self.path.name}: the guest closed the port")
        return line.strip()

    def send_line(self, text: str) -> None:
        assert self.peer is not None
        self.peer.sendall(text.encode() + b"\n")

    def relay_to(self, server_path: Path) -> None:
        """Copy bytes both ways between the port and a new connection to `server_path`."""
        assert self.peer is not None
        self.peer.settimeout(None)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(str(server_path))
        for source, sink in ((self.peer, upstream), (upstream, self.peer)):
            thread = threading.Thread(target=_copy, args=(source, sink), daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        for sock in (self.peer, self.listener):
            if sock is not None:
                sock.close()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # either side closed: the other copier sees it too


def lines_with(console: str, *needles: str) -> Iterator[str]:
    return (line for line in console.splitlines() if all(n in line for n in needles))
