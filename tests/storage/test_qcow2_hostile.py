"""Hostile qcow2 images: made by qemu-img, then one metadata entry patched. Each attack must
fail its request with EIO, mark the image corrupt (header bit, read-only from then on),
report it, never return metadata bytes, never grow the file, and leave `qemu-img check`
reporting exactly what it reported before nbdguard touched the image."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdguard.config import ExportConfig
from nbdguard.observability.reporter import ExportReporter
from nbdguard.storage.qcow2.image import Qcow2Image
from nbdguard.storage.stack import build_device
from tests.storage.qcow2_patch import COMPRESSED, COPIED, OFFSET_MASK, Qcow2File

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

MiB = 1 << 20
CORRUPT_BIT = 1 << 1
INCOMPATIBLE_AT = 72


class Recorder(ExportReporter):
    def __init__(self) -> None:
        super().__init__("t")
        self.seen: list[dict[str, Any]] = []

    def qcow2_corrupt(
        self, *, kind: str, detail: str, guest_offset: int | None, host_offset: int | None
    ) -> None:
        self.seen.append({"kind": kind, "host_offset": host_offset})


def qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def check(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)], capture_output=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    result.pop("filename", None)
    return result


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M")
    qemu(
        "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", "-c", "write -P 7 1M 64k", str(path)
    )
    return path


class Attack:
    """Patch the image, open it in nbdguard, and afterwards judge what nbdguard did."""

    def __init__(self, path: Path, patch: Callable[[Qcow2File], None], *, read_only: bool = False):
        self.path = path
        self.q = Qcow2File(path)
        patch(self.q)
        self.before = path.read_bytes()
        self.before_check = check(path)
        self.reporter = Recorder()
        config = ExportConfig(name="t", path=path, format="qcow2", read_only=read_only)
        device = build_device(config, self.reporter)
        assert isinstance(device, Qcow2Image)
        self.device = device

    def expect_eio(self, call: Callable[[], object], kind: str) -> None:
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.EIO
        assert self.reporter.seen and self.reporter.seen[-1]["kind"] == kind

    def finish(self, *, marked: bool = True, intact: bool = True) -> None:
        # Read-only from now on; intact data is still served.
        if marked:
            with pytest.raises(OSError) as caught:
                self.device.pwrite(b"x" * 512, 4 * MiB)
            assert caught.value.errno == errno.EROFS
        if intact:  # (not when the one L2 table of this small image is what is broken)
            assert bytes(self.device.pread(MiB, 4096)) == b"\x07" * 4096
        self.device.close()
        after = self.path.read_bytes()
        assert len(after) == len(self.before)  # never grown
        expected = bytearray(self.before)
        if marked:
            flags = int.from_bytes(expected[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8], "big")
            expected[INCOMPATIBLE_AT : INCOMPATIBLE_AT + 8] = (flags | CORRUPT_BIT).to_bytes(
                8, "big"
            )
        assert after == bytes(expected)  # only the corrupt bit changed, nothing else
        assert check(self.path) == self.before_check


def test_compressed_descriptor_inside_cluster_0(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l2_entry_at(0), COMPRESSED | 0))
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "compressed_entry")
    attack.finish()


@pytest.mark.parametrize("target", ["l1", "refcount_table", "refcount_block", "l2"])
def test_l2_entry_pointing_at_metadata(image: Path, target: str) -> None:
    def patch(q: Qcow2File) -> None:
        where = {
            "l1": q.l1_offset,
            "refcount_table": q.refcount_table_offset,
            "refcount_block": q.u64(q.refcount_table_offset) & ~0x1FF,
            "l2": q.u64(q.l1_entry_at(0)) & OFFSET_MASK,
        }[target]
        q.set_u64(q.l2_entry_at(64 << 10), where | COPIED)

    attack = Attack(image, patch)
    attack.expect_eio(lambda: attack.device.pread(0, 128 << 10), "l2_entry")
    attack.finish()


def test_in_place_write_into_metadata_is_refused(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l2_entry_at(0), q.l1_offset | COPIED))
    attack.expect_eio(lambda: attack.device.pwrite(b"\xff" * 4096, 0), "l2_entry")
    attack.device.flush()
    attack.finish()


def test_l2_entry_far_past_end_of_file(image: Path) -> None:
    far = ((image.stat().st_size >> 16) + (1 << 14)) << 16  # 1 GiB past the end
    attack = Attack(image, lambda q: q.set_u64(q.l2_entry_at(0), far | COPIED))
    attack.expect_eio(lambda: attack.device.pwrite(b"\xff" * 4096, 0), "l2_entry")
    attack.finish()


def test_l1_entry_pointing_at_refcount_table(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l1_offset, q.refcount_table_offset | COPIED))
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "l1_entry")
    attack.finish(intact=False)


def test_l1_entry_with_reserved_bits(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_u64(q.l1_offset, q.u64(q.l1_offset) | 1 << 60))
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "l1_entry")
    attack.finish(intact=False)


def test_refcount_claiming_metadata_free(image: Path) -> None:
    attack = Attack(image, lambda q: q.set_refcount(q.l1_offset >> q.cluster_bits, 0))
    # Allocating needs a new L2 table: the allocator meets the "free" L1 cluster.
    attack.expect_eio(
        lambda: attack.device.pwrite(b"\xff" * 4096, 8 * MiB), "refcount_metadata_free"
    )
    attack.finish()


def test_refcount_decrement_below_zero(image: Path) -> None:
    def patch(q: Qcow2File) -> None:
        data = q.u64(q.l2_entry_at(0)) & OFFSET_MASK
        q.set_refcount(data >> q.cluster_bits, 0)

    attack = Attack(image, patch)
    attack.expect_eio(lambda: attack.device.trim(0, 64 << 10), "refcount_zero")
    attack.device.flush()
    attack.finish()


def test_read_only_image_reports_but_is_not_changed(image: Path) -> None:
    attack = Attack(
        image, lambda q: q.set_u64(q.l2_entry_at(0), q.l1_offset | COPIED), read_only=True
    )
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "l2_entry")
    attack.finish(marked=False)


def test_acknowledged_writes_survive_corruption(image: Path) -> None:
    q = Qcow2File(image)
    q.set_u64(q.l2_entry_at(0), q.refcount_table_offset | COPIED)
    reporter = Recorder()
    device = build_device(ExportConfig(name="t", path=image, format="qcow2"), reporter)
    device.pwrite(b"\xab" * 65536, 4 * MiB)  # acknowledged, metadata not yet flushed
    with pytest.raises(OSError):
        device.pread(0, 4096)
    device.close()
    out = image.with_suffix(".raw")
    qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out))
    assert out.read_bytes()[4 * MiB : 4 * MiB + 65536] == b"\xab" * 65536
    assert Qcow2File(image).u64(INCOMPATIBLE_AT) & CORRUPT_BIT


@pytest.fixture
def compressed(tmp_path: Path) -> Path:
    raw = tmp_path / "a.raw"
    qemu("qemu-img", "create", "-q", "-f", "raw", str(raw), "16M")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 128k", "-c", "write -P 7 1M 64k", str(raw))
    path = tmp_path / "c.qcow2"
    qemu("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    return path


def test_compressed_descriptor_past_end_of_file(compressed: Path) -> None:
    def patch(q: Qcow2File) -> None:
        word = q.u64(q.l2_entry_at(0))
        shift = 62 - (q.cluster_bits - 8)
        far = (compressed.stat().st_size + (1 << 30)) & ((1 << shift) - 1)
        q.set_u64(q.l2_entry_at(0), (word & ~((1 << shift) - 1)) | far)

    attack = Attack(compressed, patch)
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "compressed_entry")
    attack.finish()


def test_compressed_descriptor_over_the_l1_table(compressed: Path) -> None:
    def patch(q: Qcow2File) -> None:
        word = q.u64(q.l2_entry_at(0))
        shift = 62 - (q.cluster_bits - 8)
        q.set_u64(q.l2_entry_at(0), (word & ~((1 << shift) - 1)) | q.l1_offset)

    attack = Attack(compressed, patch)
    attack.expect_eio(lambda: attack.device.pread(0, 4096), "compressed_entry")
    attack.finish()
