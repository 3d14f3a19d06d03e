"""The Linux kernel's NBD client (nbd-client + nbd.ko) on an nbdguard export, inside a VM.

The guest reaches the server only through a virtio-serial port wired to nbdguard's Unix
socket; socat turns the port into the Unix socket nbd-client wants."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guard.samples import MBR
from tests.interop.conftest import ExportSpec, RunningServer, run, start_server
from tests.vm.harness import GuestImage, boot, lines_with

pytestmark = [pytest.mark.vm, pytest.mark.interop]

SIZE = 32 << 20
# QEMU connects every port when it starts; the guest chooses the export only after booting.
HANDSHAKE_TIMEOUT = 120

ATTACH = """
/usr/bin/socat UNIX-LISTEN:/tmp/nbd0.sock /dev/virtio-ports/nbd0 &
while [ ! -S /tmp/nbd0.sock ]; do usleep 20000; done
/usr/sbin/nbd-client -unix /tmp/nbd0.sock /dev/nbd0 -N {export} -b 512
echo "@@SIZE=$(blockdev --getsize64 /dev/nbd0)@@"
echo "@@BLOCK=$(blockdev --getss /dev/nbd0)@@"
"""
DETACH = """
/usr/sbin/nbd-client -d /dev/nbd0
echo "@@DETACHED=1@@"
"""


@pytest.fixture
def served(tmp_path: Path, guest: GuestImage) -> Iterator[RunningServer]:
    server = start_server(
        tmp_path / "srv",
        [ExportSpec("vm1", size=SIZE)],
        metrics=True,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    yield server
    assert server.stop() == 0, server.log()


def debugfs_cat(image: Path, name: str) -> bytes:
    result = subprocess.run(
        ["debugfs", "-R", f"cat {name}", str(image)], capture_output=True, timeout=60, check=True
    )
    return result.stdout


def e2fsck_clean(image: Path) -> None:
    result = run("e2fsck", "-fn", str(image), check=False)
    assert result.returncode == 0, f"e2fsck -fn: {result.returncode}\n{result.stdout}"


def test_kernel_attach_mkfs_write_remount_read(tmp_path: Path, served: RunningServer) -> None:
    payload = os.urandom(3 << 20)
    text = b"written by the guest kernel through nbdguard\n"
    script = (
        ATTACH.format(export="vm1")
        + """
/usr/sbin/mke2fs -q -t ext4 -F /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt
cp /data/payload.bin /mnt/payload.bin
cp /data/note.txt /mnt/note.txt
sync
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/nbd0 /mnt
echo "@@PAYLOAD=$(sha256sum /mnt/payload.bin | cut -d' ' -f1)@@"
echo "@@NOTE=$(sha256sum /mnt/note.txt | cut -d' ' -f1)@@"
umount /mnt
"""
        + DETACH
    )
    guest_run = boot(
        tmp_path / "vm",
        script,
        ports={"nbd0": served.socket_path},
        files={"/data/payload.bin": payload, "/data/note.txt": text},
    ).check()
    marks = guest_run.marks()
    assert marks["SIZE"] == str(SIZE)
    assert marks["BLOCK"] == "512"
    assert marks["PAYLOAD"] == hashlib.sha256(payload).hexdigest()
    assert marks["NOTE"] == hashlib.sha256(text).hexdigest()
    assert marks["DETACHED"] == "1"
    image = served.images["vm1"]
    e2fsck_clean(image)
    assert debugfs_cat(image, "/payload.bin") == payload
    assert debugfs_cat(image, "/note.txt") == text


def test_guest_sees_refused_header_write_as_io_error(tmp_path: Path, served: RunningServer) -> None:
    header_image = tmp_path / "header.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(header_image), "1M")
    header = header_image.read_bytes()[:512]
    assert header.startswith(b"QFI\xfb")
    note = b"the file system survives a refused header write\n"
    script = (
        ATTACH.format(export="vm1")
        + """
/usr/sbin/mke2fs -q -t ext4 -F /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt
cp /data/note.txt /mnt/note.txt
umount /mnt
/usr/bin/dd if=/data/mbr.bin of=/dev/nbd0 bs=512 count=1 oflag=direct status=none
echo "@@MBR=ok@@"
if /usr/bin/dd if=/data/header.bin of=/dev/nbd0 bs=512 count=1 oflag=direct status=none \
        2>/tmp/direct.err; then
    echo "@@DIRECT=succeeded@@"
else
    echo "@@DIRECT=$(cat /tmp/direct.err)@@"
fi
if /usr/bin/dd if=/data/header.bin of=/dev/nbd0 bs=512 count=1 conv=fsync status=none \
        2>/tmp/buffered.err; then
    echo "@@BUFFERED=succeeded@@"
else
    echo "@@BUFFERED=$(cat /tmp/buffered.err)@@"
fi
blockdev --flushbufs /dev/nbd0
echo 3 > /proc/sys/vm/drop_caches
/usr/bin/dd if=/dev/nbd0 of=/tmp/sector0 bs=512 count=1 iflag=direct status=none
echo "@@SECTOR0=$(sha256sum /tmp/sector0 | cut -d' ' -f1)@@"
mount -t ext4 -o ro /dev/nbd0 /mnt
echo "@@NOTE=$(sha256sum /mnt/note.txt | cut -d' ' -f1)@@"
umount /mnt
echo "@@NBDLOG=$(dmesg | grep -c 'nbd0: Other side returned error')@@"
"""
        + DETACH
    )
    guest_run = boot(
        tmp_path / "vm",
        script,
        ports={"nbd0": served.socket_path},
        files={"/data/mbr.bin": MBR, "/data/header.bin": header, "/data/note.txt": note},
    ).check()
    marks = guest_run.marks()
    assert marks["MBR"] == "ok"
    assert "Input/output error" in marks["DIRECT"], marks["DIRECT"]
    assert "Input/output error" in marks["BUFFERED"], marks["BUFFERED"]
    assert marks["SECTOR0"] == hashlib.sha256(MBR).hexdigest()
    assert marks["NOTE"] == hashlib.sha256(note).hexdigest()
    assert int(marks["NBDLOG"]) >= 2, guest_run.console[-4000:]
    assert list(lines_with(guest_run.console, "nbd0", "error"))
    image = served.images["vm1"]
    with open(image, "rb") as handle:
        assert handle.read(512) == MBR
    e2fsck_clean(image)
    assert debugfs_cat(image, "/note.txt") == note
    blocked = served.sample(
        "nbdguard_header_writes_blocked_total", export="vm1", format="qcow2", command="write"
    )
    assert blocked == 2, served.log()[-4000:]


# Each nbd-client connection to /tmp/nbd.sock is relayed to the next unclaimed port (mkdir
# is atomic), so `-C 2` gets one virtio-serial port, hence one server connection, each.
PICK_PORT = """#!/bin/busybox sh
for n in 0 1; do
    if mkdir /tmp/claim$n 2>/dev/null; then
        echo $$ > /tmp/relay$n.pid
        exec /usr/bin/socat STDIO /dev/virtio-ports/nbd$n
    fi
done
exit 1
"""


def test_kernel_multi_connection_concurrent_io(tmp_path: Path, served: RunningServer) -> None:
    chunk = 4 << 20
    halves = [os.urandom(chunk), os.urandom(chunk)]
    script = (
        """
/usr/bin/socat UNIX-LISTEN:/tmp/nbd.sock,fork EXEC:"/bin/sh /data/pick.sh" &
while [ ! -S /tmp/nbd.sock ]; do usleep 20000; done
/usr/sbin/nbd-client -unix /tmp/nbd.sock /dev/nbd0 -N vm1 -b 512 -C 2
echo "@@SIZE=$(blockdev --getsize64 /dev/nbd0)@@"
taskset -c 0 /usr/bin/dd if=/data/half0 of=/dev/nbd0 bs=64k oflag=direct status=none &
first=$!
taskset -c 1 /usr/bin/dd if=/data/half1 of=/dev/nbd0 bs=64k seek=64 oflag=direct status=none &
second=$!
wait $first
wait $second
echo 3 > /proc/sys/vm/drop_caches
/usr/bin/dd if=/dev/nbd0 of=/tmp/back bs=64k count=128 iflag=direct status=none
echo "@@BACK=$(sha256sum /tmp/back | cut -d' ' -f1)@@"
for n in 0 1; do
    echo "@@RELAY$n=$(grep '^wchar' /proc/$(cat /tmp/relay$n.pid)/io | cut -d' ' -f2)@@"
done
"""
        + DETACH
    )
    guest_run = boot(
        tmp_path / "vm",
        script,
        ports={"nbd0": served.socket_path, "nbd1": served.socket_path},
        files={
            "/data/pick.sh": PICK_PORT.encode(),
            "/data/half0": halves[0],
            "/data/half1": halves[1],
        },
        cpus=2,
    ).check()
    marks = guest_run.marks()
    assert marks["SIZE"] == str(SIZE)
    assert marks["BACK"] == hashlib.sha256(b"".join(halves)).hexdigest()
    # Both connections carried a share of the 8 MiB the two CPUs wrote (wchar counts the
    # bytes each relay moved in both directions, hence the bound below half of one chunk).
    assert int(marks["RELAY0"]) > chunk // 4, marks
    assert int(marks["RELAY1"]) > chunk // 4, marks
    assert marks["DETACHED"] == "1"
    assert served.sample("nbdguard_connections_opened_total", export="vm1") == 2
    with open(served.images["vm1"], "rb") as handle:
        assert handle.read(2 * chunk) == b"".join(halves)
