"""A VM whose data disk is an `nbd:` drive: QEMU's own NBD client on an nbdguard qcow2
overlay export over a raw base holding an ext4 file system built on the host."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, run, start_server
from tests.vm.harness import GuestImage, boot
from tests.vm.test_kernel_client import debugfs_cat, e2fsck_clean

pytestmark = [pytest.mark.vm, pytest.mark.interop]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vm_disk_on_qcow2_overlay_export(tmp_path: Path, guest: GuestImage) -> None:
    images = tmp_path / "images"
    tree = tmp_path / "tree"
    tree.mkdir(parents=True)
    seed = os.urandom(256 << 10)
    (tree / "seed.bin").write_bytes(seed)
    base = images / "base.raw"
    images.mkdir()
    run("mke2fs", "-q", "-t", "ext4", "-d", str(tree), "-F", str(base), "24M")
    base_digest = sha256(base)
    overlay = images / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))

    server = start_server(
        tmp_path / "srv",
        [ExportSpec("vm", image=overlay, format="qcow2")],
        handshake_timeout=120,
    )
    written = os.urandom(1 << 20)
    script = """
mount -t ext4 /dev/vda /mnt
echo "@@SEED=$(sha256sum /mnt/seed.bin | cut -d' ' -f1)@@"
cp /data/written.bin /mnt/written.bin
mkdir /mnt/dir
echo "from the guest" > /mnt/dir/hello.txt
sync
umount /mnt
echo "@@SIZE=$(blockdev --getsize64 /dev/vda)@@"
"""
    try:
        guest_run = boot(
            tmp_path / "vm",
            script,
            drives=[f"file=nbd+unix:///vm?socket={server.socket_path},format=raw,if=virtio"],
            files={"/data/written.bin": written},
        ).check()
    finally:
        code = server.stop()
    assert code == 0, server.log()
    marks = guest_run.marks()
    assert marks["SEED"] == hashlib.sha256(seed).hexdigest()
    assert marks["SIZE"] == str(24 << 20)

    check = run("qemu-img", "check", "-f", "qcow2", str(overlay), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sha256(base) == base_digest, "the raw base was modified"
    merged = tmp_path / "merged.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(merged))
    e2fsck_clean(merged)
    assert debugfs_cat(merged, "/written.bin") == written
    assert debugfs_cat(merged, "/dir/hello.txt") == b"from the guest\n"
    assert debugfs_cat(merged, "/seed.bin") == seed
    assert debugfs_cat(base, "/written.bin") == b""
