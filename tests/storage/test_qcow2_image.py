"""The qcow2 engine in-process, judged by qemu-img: images are made by qemu-img, reads must
equal `qemu-img convert -O raw`, and after writes `qemu-img check` must be clean and
`qemu-img compare` must find the image equal to a raw model of the same writes."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdguard.config import ExportConfig
from nbdguard.protocol.constants import AllocationFlag
from nbdguard.storage.device import BlockDevice
from nbdguard.storage.stack import build_device

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

MiB = 1 << 20


def sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command, shell=True, check=True, capture_output=True)


def qemu_raw(image: Path, *options: str) -> bytes:
    out = image.with_suffix(".ref")
    subprocess.run(
        ["qemu-img", "convert", *options, "-O", "raw", str(image), str(out)],
        check=True,
        capture_output=True,
        cwd=image.parent,  # qemu opens a relative data-file name against its CWD
    )
    return out.read_bytes()


def open_qcow2(image: Path, *, read_only: bool = False) -> BlockDevice:
    return build_device(ExportConfig(name="t", path=image, format="qcow2", read_only=read_only))


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    """A directory with base.raw: 8 MiB, patterned data at 0-3 MiB and 5 MiB + 100 KiB."""
    sh(
        f"qemu-img create -q -f raw {tmp_path}/base.raw 8M",
        f"qemu-io -f raw -c 'write -P 0x11 0 3M' -c 'write -P 0x12 5M 100k' {tmp_path}/base.raw",
    )
    yield tmp_path


def read_all(device: BlockDevice, step: int = MiB) -> bytes:
    return b"".join(
        bytes(device.pread(offset, min(step, device.size - offset)))
        for offset in range(0, device.size, step)
    )


READ_CHAINS = {
    "overlay-512": "create -f qcow2 -o cluster_size=512 -b base.raw -F raw top.qcow2 12M",
    "overlay-4k": "create -f qcow2 -o cluster_size=4k -b base.raw -F raw top.qcow2 12M",
    "overlay-64k": "create -f qcow2 -b base.raw -F raw top.qcow2 12M",
    "overlay-2M": "create -f qcow2 -o cluster_size=2M -b base.raw -F raw top.qcow2 12M",
    "extended-l2": "create -f qcow2 -o extended_l2=on -b base.raw -F raw top.qcow2 12M",
    "v2": "create -f qcow2 -o compat=0.10 -b base.raw -F raw top.qcow2 12M",
    "zlib": "convert -c -O qcow2 -o compression_type=zlib base.raw top.qcow2",
    "zstd": "convert -c -O qcow2 -o compression_type=zstd base.raw top.qcow2",
    "data-file": "create -f qcow2 -o data_file=top.data top.qcow2 12M",
}


@pytest.mark.parametrize("chain", READ_CHAINS)
def test_reads_equal_qemu_img_convert(images: Path, chain: str) -> None:
    sh(f"cd {images} && qemu-img {READ_CHAINS[chain]}")
    top = images / "top.qcow2"
    if not chain.startswith(("zlib", "zstd")):
        writes = "-c 'write -P 0x21 1000 70000' -c 'write -P 0x22 9M 77'"
        zero = "" if chain == "v2" else "-c 'write -z 6M 1M' -c 'write -z 70000 8192'"
        sh(f"cd {images} && qemu-io -f qcow2 {writes} {zero} {top}")
    want = qemu_raw(top)
    device = open_qcow2(top, read_only=True)
    try:
        assert read_all(device) == want
        rng = random.Random(chain)
        for _ in range(300):
            offset = rng.randrange(device.size)
            length = rng.randrange(1, min(300_000, device.size - offset) + 1)
            assert bytes(device.pread(offset, length)) == want[offset : offset + length]
    finally:
        device.close()


def test_depth_three_with_a_short_base(images: Path) -> None:
    sh(
        f"cd {images} && qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 10M",
        f"qemu-io -f qcow2 -c 'write -P 0x31 2M 2M' -c 'write -P 0x32 9M 1M' {images}/mid.qcow2",
        f"cd {images} && qemu-img create -q -f qcow2 -o cluster_size=4k "
        "-b mid.qcow2 -F qcow2 top.qcow2 16M",
        f"qemu-io -f qcow2 -c 'write -P 0x41 2500k 8k' -c 'write -P 0x42 15M 1k' "
        f"{images}/top.qcow2",
    )
    device = open_qcow2(images / "top.qcow2", read_only=True)
    try:
        assert read_all(device) == qemu_raw(images / "top.qcow2")
    finally:
        device.close()


def status_map(device: BlockDevice) -> list[tuple[int, int, bool]]:
    """(offset, length, data?) over the whole device, as BLOCK_STATUS would report it."""
    out: list[tuple[int, int, bool]] = []
    offset = 0
    while offset < device.size:
        for length, flags in device.block_status(offset, device.size - offset, 64):
            out.append((offset, length, not flags & AllocationFlag.HOLE))
            offset += length
    return out


def test_block_status_matches_qemu_img_map(images: Path) -> None:
    sh(
        f"cd {images} && qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 12M",
        f"qemu-io -f qcow2 -c 'write -P 0x21 4M 64k' -c 'write -z 0 1M' {images}/top.qcow2",
    )
    result = subprocess.run(
        ["qemu-img", "map", "--output=json", str(images / "top.qcow2")],
        check=True,
        capture_output=True,
        text=True,
    )
    import json

    qemu = {(e["start"], e["length"]): e["data"] for e in json.loads(result.stdout)}
    device = open_qcow2(images / "top.qcow2", read_only=True)
    try:
        ours = status_map(device)
    finally:
        device.close()

    def data_at(extents: dict[tuple[int, int], bool], offset: int) -> bool:
        return next(d for (s, n), d in extents.items() if s <= offset < s + n)

    mine = {(s, n): d for s, n, d in ours}
    for offset in range(0, 12 * MiB, 64 * 1024):
        assert data_at(mine, offset) == data_at(qemu, offset), offset


def apply_workload(device: BlockDevice, model: bytearray, seed: int, ops: int = 300) -> None:
    """Random writes, zeroes, trims and flushes on the device and the same on the model."""
    rng = random.Random(seed)
    size = device.size
    for _ in range(ops):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, 300_000) + 1)
        roll = rng.random()
        if roll < 0.6:
            data = rng.randbytes(16) * (length // 16) + rng.randbytes(length % 16)
            device.pwrite(data, offset)
            model[offset : offset + length] = data
        elif roll < 0.75:
            device.write_zeroes(offset, length, may_trim=rng.random() < 0.5, fast=False)
            model[offset : offset + length] = bytes(length)
        elif roll < 0.85:
            device.trim(offset, length)  # contents undefined by NBD: learn them
            model[offset : offset + length] = bytes(device.pread(offset, length))
        elif roll < 0.95:
            assert bytes(device.pread(offset, length)) == model[offset : offset + length]
        else:
            device.flush()


def check_and_compare(image: Path, model: bytes) -> None:
    check = subprocess.run(
        ["qemu-img", "check", str(image)], capture_output=True, text=True, cwd=image.parent
    )
    assert check.returncode == 0, check.stdout + check.stderr
    raw = image.with_suffix(".model")
    raw.write_bytes(model)
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
        cwd=image.parent,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


WRITE_CHAINS = {
    "overlay-512": "create -f qcow2 -o cluster_size=512 -b base.raw -F raw top.qcow2 12M",
    "overlay-4k": "create -f qcow2 -o cluster_size=4k -b base.raw -F raw top.qcow2 12M",
    "overlay-64k": "create -f qcow2 -b base.raw -F raw top.qcow2 12M",
    "no-backing-4k": "create -f qcow2 -o cluster_size=4k top.qcow2 12M",
    "v2-overlay-4k": "create -f qcow2 -o compat=0.10,cluster_size=4k -b base.raw -F raw "
    "top.qcow2 12M",
    "v2-no-backing": "create -f qcow2 -o compat=0.10 top.qcow2 12M",
    "extended-l2": "create -f qcow2 -o extended_l2=on -b base.raw -F raw top.qcow2 12M",
    "compressed": "convert -c -O qcow2 base.raw top.qcow2",
    "refcount-bits-1": "create -f qcow2 -o refcount_bits=1,cluster_size=4k top.qcow2 12M",
    "refcount-bits-64": "create -f qcow2 -o refcount_bits=64,cluster_size=4k top.qcow2 12M",
    "data-file": "create -f qcow2 -o data_file=top.data top.qcow2 12M",
}


@pytest.mark.parametrize("chain", WRITE_CHAINS)
def test_random_writes_keep_the_image_consistent(images: Path, chain: str) -> None:
    sh(f"cd {images} && qemu-img {WRITE_CHAINS[chain]}")
    top = images / "top.qcow2"
    model = bytearray(qemu_raw(top))
    device = open_qcow2(top)
    try:
        apply_workload(device, model, seed=len(chain))
    finally:
        device.close()
    check_and_compare(top, bytes(model))


def test_internal_snapshot_is_untouched_by_writes(images: Path) -> None:
    top = images / "snap.qcow2"
    sh(
        f"qemu-img create -q -f qcow2 -o cluster_size=4k {top} 8M",
        f"qemu-io -f qcow2 -c 'write -P 0x77 0 3M' -c 'write -c -P 0x78 4M 64k' {top}",
        f"qemu-img snapshot -c before {top}",
    )
    snapshot = qemu_raw(top, "-l", "snapshot.name=before")
    model = bytearray(qemu_raw(top))
    device = open_qcow2(top)
    try:
        apply_workload(device, model, seed=7, ops=400)
    finally:
        device.close()
    check_and_compare(top, bytes(model))
    assert qemu_raw(top, "-l", "snapshot.name=before") == snapshot


def test_unknown_autoclear_bits_are_cleared_before_writing(images: Path) -> None:
    top = images / "top.qcow2"
    sh(f"qemu-img create -q -f qcow2 {top} 1M")
    with open(top, "r+b") as handle:
        handle.seek(88)
        handle.write((1 << 40).to_bytes(8, "big"))
    open_qcow2(top, read_only=True).close()
    assert int.from_bytes(top.read_bytes()[88:96], "big") == 1 << 40  # readers leave it
    open_qcow2(top).close()
    assert int.from_bytes(top.read_bytes()[88:96], "big") == 0


def test_fast_zero_is_refused_where_it_would_write(images: Path) -> None:
    sh(f"cd {images} && qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M")
    sh(f"cd {images} && qemu-img create -q -f qcow2 v3.qcow2 1M")
    v2, v3 = open_qcow2(images / "v2.qcow2"), open_qcow2(images / "v3.qcow2")
    try:
        with pytest.raises(OSError, match="no zero clusters"):
            v2.write_zeroes(0, 65536, may_trim=False, fast=True)
        with pytest.raises(OSError, match="part of a cluster"):
            v3.write_zeroes(100, 65536, may_trim=False, fast=True)
        v3.pwrite(b"\xff" * 65536, 0)
        v3.write_zeroes(0, 65536, may_trim=False, fast=True)
        assert bytes(v3.pread(0, 65536)) == bytes(65536)
    finally:
        v2.close()
        v3.close()
    check_and_compare(images / "v3.qcow2", bytes(1 << 20))


def workload_while_flushing(device: BlockDevice, model: bytearray, *, seed: int, ops: int) -> int:
    """apply_workload while another thread flushes in a loop; returns how many flushes ran."""
    import threading

    stop = threading.Event()
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        while not stop.is_set():
            device.flush()
            flushes += 1

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        apply_workload(device, model, seed=seed, ops=ops)
    finally:
        stop.set()
        thread.join()
    return flushes


def test_flushes_in_another_thread_while_writing(images: Path) -> None:
    """The dispatcher runs FLUSH in a worker thread while requests go on: the image must
    stay consistent whatever the interleaving."""
    sh(f"cd {images} && qemu-img create -q -f qcow2 -o cluster_size=512 "
       "-b base.raw -F raw top.qcow2 12M")  # fmt: skip
    top = images / "top.qcow2"
    model = bytearray(qemu_raw(top))
    device = open_qcow2(top)
    try:
        flushes = workload_while_flushing(device, model, seed=11, ops=500)
    finally:
        device.close()
    assert flushes > 5
    check_and_compare(top, bytes(model))


@pytest.mark.parametrize("cluster", [4096, 65536, 2 << 20])
def test_parts_of_writes_end_on_cluster_boundaries(images: Path, cluster: int) -> None:
    """A part ending mid-cluster would copy on write what the next part overwrites."""
    sh(f"qemu-img create -q -f qcow2 -o cluster_size={cluster} {images}/top.qcow2 8M")
    device = open_qcow2(images / "top.qcow2")
    assert device.partial_write_unit(0) == device.partial_write_unit(12345) == cluster
    device.close()


def test_large_reads_are_file_ranges_rechecked_after_clusters_are_reused(images: Path) -> None:
    """A read reply can wait while its cluster is discarded, freed by a flush and reused for
    another guest offset: the range then reads the device again instead of the file."""
    sh(f"cd {images} && qemu-img create -q -f qcow2 top.qcow2 8M")
    device = open_qcow2(images / "top.qcow2")
    try:
        first = os.urandom(MiB)
        device.pwrite(first, 0)
        device.flush()
        queued = device.read_range(0, MiB)
        assert queued is not None and queued.recheck is not None
        assert os.pread(queued.fd, queued.length, queued.offset) == first
        assert queued.recheck() is None  # nothing freed yet: the file holds the bytes

        device.trim(0, MiB)
        device.flush()  # the trimmed clusters are free from here on
        other = os.urandom(MiB)
        device.pwrite(other, 4 * MiB)  # and get reused
        assert os.pread(queued.fd, queued.length, queued.offset) == other  # the hazard is real
        assert queued.recheck() == bytes(MiB)  # what guest offset 0 holds now
        assert device.read_range(4 * MiB, MiB) is not None
    finally:
        device.close()


def test_read_ranges_cover_only_single_runs_of_data(images: Path) -> None:
    sh(
        f"cd {images} && qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 8M",
        f"qemu-io -f qcow2 -c 'write -P 0x21 4M 1M' -c 'write -z 6M 1M' {images}/top.qcow2",
    )
    device = open_qcow2(images / "top.qcow2", read_only=True)
    try:
        ours = device.read_range(4 * MiB, MiB)
        assert ours is not None and ours.recheck is None  # read-only: nothing is ever freed
        assert os.pread(ours.fd, ours.length, ours.offset) == b"\x21" * MiB
        below = device.read_range(0, MiB)  # all from the raw base
        assert below is not None and os.pread(below.fd, MiB, below.offset) == b"\x11" * MiB
        assert device.read_range(6 * MiB, MiB) is None  # zeros: nothing to send from a file
        assert device.read_range(4 * MiB - 4096, 8192) is None  # base, then ours
    finally:
        device.close()
