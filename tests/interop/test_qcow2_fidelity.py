"""qcow2 fidelity against QEMU as the reference: chains built with qemu-img/qemu-io are served
by nbdguard and must read byte for byte as `qemu-img convert` reads them, with a block status
consistent with `qemu-img map`; a seeded random workload written through nbdguard must leave
an image that `qemu-img check` finds clean and `qemu-img compare` finds equal to a raw model;
internal snapshots survive writes to the active layer; kill -9 loses no flushed write."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import ExportSpec, RunningServer, require, start_server

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
Handle = Any  # nbd.NBD: the module is imported at run time, so mypy cannot name it
pytestmark = pytest.mark.interop

BLOCK = 4096  # granularity of the allocation comparison
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# scaffolding: shell steps, references computed by qemu-img, comparisons


def sh(directory: Path, *commands: str) -> None:
    """Run shell commands in `directory`, failing with their output."""
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=directory, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"


def tool(
    *command: str, ok: tuple[int, ...] = (0,), cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a tool; qemu tools run in the image's directory (`cwd`): qemu 7.2 resolves a relative
    data_file name against its working directory (backing names against the image's)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode in ok, f"{' '.join(command)} exited {result.returncode}\n" + (
        result.stdout + result.stderr
    )
    return result


def write_noise(directory: Path, size: int = MiB, seed: int = 7) -> None:
    """noise.bin: incompressible bytes for `qemu-io -c 'write -s noise.bin ...'` and dd."""
    (directory / "noise.bin").write_bytes(random.Random(seed).randbytes(size))


def qemu_raw(image: Path, out: Path, *options: str) -> bytes:
    """The guest view of `image` (with its whole backing chain) as qemu reads it."""
    command = ("qemu-img", "convert", "-f", "qcow2", *options, "-O", "raw", str(image), str(out))
    tool(*command, cwd=image.parent)
    return out.read_bytes()


def first_difference(ours: bytes, theirs: bytes) -> str:
    if len(ours) != len(theirs):
        return f"sizes differ: {len(ours)} != {len(theirs)}"
    view_a, view_b = memoryview(ours), memoryview(theirs)
    step = 64 << 10
    for start in range(0, len(ours), step):
        if view_a[start : start + step] != view_b[start : start + step]:
            for offset in range(start, min(start + step, len(ours))):
                if ours[offset] != theirs[offset]:
                    return f"first difference at {offset:#x}: {ours[offset]} != {theirs[offset]}"
    return "identical"


def assert_same(ours: bytes, theirs: bytes) -> None:
    assert ours == theirs, first_difference(ours, theirs)


def qemu_map(image: Path) -> list[dict[str, object]]:
    result = tool("qemu-img", "map", "-f", "qcow2", "--output=json", str(image), cwd=image.parent)
    return list(json.loads(result.stdout))


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """base:allocation as (offset, length, type): bit 0 hole, bit 1 reads as zero."""
    extents = json.loads(tool("nbdinfo", "--map", "--json", uri).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in extents]


def blocks_touched(start: int, length: int) -> range:
    return range(start // BLOCK, (start + length + BLOCK - 1) // BLOCK)


def check_allocation(
    qemu: list[dict[str, object]], ours: list[tuple[int, int, int]], reference: bytes
) -> None:
    """Compare nbdguard's base:allocation with qemu-img map, per 4 KiB block (so neither side's
    splitting or merging of extents matters):
    - a block holding any byte qemu calls data:true must hold some byte nbdguard does not call
      a hole (with 512-byte clusters a 4 KiB block can be part data, part hole on either side);
    - every byte nbdguard flags NBD_STATE_ZERO must read as zero (the NBD spec's promise);
    - every byte qemu reports zero:true data:false reads as zero (qemu's own promise, checked on
      the reference so that a mistake in this scaffolding shows up here).
    The other direction (nbdguard data => qemu data) is deliberately not checked: a server may
    report allocated data for a range qemu knows to be a hole (e.g. a raw base file whose
    holes it does not probe, or a data_file_raw image), and the NBD spec allows that."""
    size = len(reference)
    covered = 0
    not_hole: set[int] = set()
    for offset, length, kind in ours:
        assert offset == covered, f"extents not contiguous at {offset:#x}"
        covered += length
        if not kind & 1:
            not_hole.update(blocks_touched(offset, length))
        if kind & 2:
            assert not any(reference[offset : offset + length]), (
                f"nbdguard flags {offset:#x}+{length:#x} zero, but it holds data"
            )
    assert covered == size, f"base:allocation covers {covered:#x} of {size:#x}"
    missing: list[int] = []
    for extent in qemu:
        start, length = int(extent["start"]), int(extent["length"])  # type: ignore[call-overload]
        if extent["data"]:
            missing += [b for b in blocks_touched(start, length) if b not in not_hole]
        elif extent["zero"]:
            assert not any(reference[start : start + length]), f"qemu zero at {start:#x}"
    assert not missing, f"qemu reports data in 4 KiB blocks {missing[:8]}... nbdguard: holes"


def serve_qcow2(directory: Path, top: Path, *, read_only: bool, name: str = "top") -> RunningServer:
    return start_server(
        directory, [ExportSpec(name, image=top, format="qcow2", read_only=read_only)]
    )


def stop_clean(server: RunningServer) -> None:
    code = server.stop()
    assert code == 0, server.log()


# ---------------------------------------------------------------------------------------------
# 1. read fidelity: chains made by qemu-img and qemu-io, read back through nbdguard

QIO = "qemu-io -f qcow2"
RAW_BASE_8M = (
    "qemu-img create -q -f raw base.raw 8M",
    "qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x12 3M 1M' -c 'write -P 0x13 7M 1M' "
    "base.raw",
)


def cluster_chain(cluster: str, size: str = "16M") -> tuple[str, ...]:
    """A raw base under an overlay of the given cluster size; writes at odd offsets and sizes
    (partial-cluster copy-on-write from the base), zeroes, and data past the base's end."""
    return (
        *RAW_BASE_8M,
        f"qemu-img create -q -f qcow2 -o cluster_size={cluster} -b base.raw -F raw "
        f"top.qcow2 {size}",
        f"{QIO} -c 'write -P 0x21 1000 3001' -c 'write -P 0x22 100000 70001' "
        "-c 'write -z 3100000 9000' -c 'write -z -u 7M 512k' -c 'write -s noise.bin 5M 123457' "
        "-c 'write -P 0x23 9437000 4000' -c 'write -P 0x24 2M 2M' top.qcow2",
    )


def compressed_chain(kind: str, cluster: str) -> tuple[str, ...]:
    """`qemu-img convert -c` of noise (stored uncompressed: it does not shrink), a pattern
    (compressed) and zeros; then a partial rewrite of a compressed cluster."""
    return (
        "qemu-img create -q -f raw src.raw 8M",
        "dd if=noise.bin of=src.raw bs=64k seek=16 count=16 conv=notrunc status=none",
        "qemu-io -f raw -c 'write -P 0x31 2M 1M' -c 'write -P 0x32 6M 300000' src.raw",
        f"qemu-img convert -q -c -f raw -O qcow2 -o compression_type={kind},cluster_size={cluster} "
        "src.raw top.qcow2",
        f"{QIO} -c 'write -P 0x33 2100000 5000' top.qcow2",
    )


CHAINS: dict[str, tuple[str, ...]] = {
    "cluster-512": cluster_chain("512", "12M"),
    "cluster-4k": cluster_chain("4k"),
    "cluster-64k": cluster_chain("64k"),
    "cluster-2M": cluster_chain("2M", "24M"),
    "compressed-zlib-64k": compressed_chain("zlib", "64k"),
    "compressed-zstd-64k": compressed_chain("zstd", "64k"),
    "compressed-zstd-4k": compressed_chain("zstd", "4k"),
    "compressed-in-overlay": (
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -o compression_type=zstd -b base.raw -F raw top.qcow2 8M",
        f"{QIO} -c 'write -c -P 0x41 0 64k' -c 'write -c -s noise.bin 3M 64k' "
        "-c 'write -c -P 0x42 5M 128k' top.qcow2",
    ),
    "zero-clusters-v3": (
        "qemu-img create -q -f qcow2 -o compat=1.1 top.qcow2 8M",
        f"{QIO} -c 'write -P 0x51 0 4M' -c 'write -z 64k 128k' -c 'write -z 1000 3000' "
        "-c 'write -z -u 1M 256k' -c 'write -z 6M 64k' top.qcow2",
    ),
    "zero-clusters-over-base": (
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -o compat=1.1 -b base.raw -F raw top.qcow2 8M",
        f"{QIO} -c 'write -z 0 64k' -c 'write -z -u 3M 192k' -c 'write -z 7M 1000' top.qcow2",
    ),
    "extended-l2-64k": (
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -o cluster_size=64k,extended_l2=on -b base.raw -F raw "
        "top.qcow2 10M",
        f"{QIO} -c 'write -P 0x61 2k 2k' -c 'write -P 0x62 70000 777' -c 'write -z 8k 4k' "
        "-c 'write -z -u 3M 64k' -c 'write -z 3200k 6k' -c 'write -P 0x63 9M 100k' "
        "-c 'write -P 0x64 7M 30k' top.qcow2",
    ),
    "extended-l2-16k": (
        "qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on top.qcow2 8M",
        f"{QIO} -c 'write -P 0x65 512 512' -c 'write -P 0x66 1M 100k' -c 'write -z 1M 1k' "
        "-c 'write -s noise.bin 4M 33k' top.qcow2",
    ),
    "data-file": (
        "qemu-img create -q -f qcow2 -o data_file=top.data top.qcow2 8M",
        f"{QIO} -c 'write -P 0x71 0 1M' -c 'write -P 0x72 5000 3000' -c 'write -z 512k 64k' "
        "-c 'write -s noise.bin 6M 200k' top.qcow2",
    ),
    "data-file-raw": (
        "qemu-img create -q -f qcow2 -o data_file=top.data,data_file_raw=on top.qcow2 8M",
        f"{QIO} -c 'write -P 0x73 0 1M' -c 'write -P 0x74 5000 3000' -c 'write -z 512k 64k' "
        "-c 'write -s noise.bin 6M 200k' top.qcow2",
    ),
    "data-file-with-backing": (
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -o data_file=top.data -b base.raw -F raw top.qcow2 8M",
        f"{QIO} -c 'write -P 0x75 100000 5000' -c 'write -z 3M 64k' top.qcow2",
    ),
    "raw-base": (
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 8M",
        f"{QIO} -c 'write -P 0x81 512k 64k' -c 'write -P 0x82 3500k 1234' top.qcow2",
    ),
    "qcow2-base": (
        "qemu-img create -q -f qcow2 -o cluster_size=64k base.qcow2 8M",
        "qemu-io -f qcow2 -c 'write -P 0x91 0 2M' -c 'write -z 1M 64k' base.qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 top.qcow2 8M",
        f"{QIO} -c 'write -P 0x92 4097 5000' -c 'write -z 1500k 4k' top.qcow2",
    ),
    "v2-overlay": (
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -o compat=0.10 -b base.raw -F raw top.qcow2 8M",
        f"{QIO} -c 'write -P 0xa1 4095 8194' -c 'write -z 3M 64k' top.qcow2",
    ),
    "depth-3-growing": (  # base 4M <- mid 6M <- top 8M: past each short layer's end: zeros
        "qemu-img create -q -f raw base.raw 4M",
        "qemu-io -f raw -c 'write -P 0xb1 0 4M' base.raw",
        "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 6M",
        f"{QIO} -c 'write -P 0xb2 1M 1M' -c 'write -P 0xb3 3900k 200k' -c 'write -P 0xb4 5M 4k' "
        "mid.qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=4k -b mid.qcow2 -F qcow2 top.qcow2 8M",
        f"{QIO} -c 'write -P 0xb5 1500k 100k' -c 'write -P 0xb6 4000000 300000' "
        "-c 'write -z 5M 2k' -c 'write -P 0xb7 7M 5k' top.qcow2",
    ),
    "depth-3-shrinking": (  # base 8M <- mid 4M <- top 6M: base data past mid's end is hidden
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 4M",
        f"{QIO} -c 'write -P 0xc1 500k 100k' mid.qcow2",
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 6M",
        f"{QIO} -c 'write -P 0xc2 3M 2M' -c 'write -P 0xc3 4100000 1000' top.qcow2",
    ),
    "top-smaller-than-base": (
        *RAW_BASE_8M,
        "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 6M",
        f"{QIO} -c 'write -P 0xd1 5M 1M' top.qcow2",
    ),
}


def build_chain(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_noise(directory)
    sh(directory, *CHAINS[name])
    return directory / "top.qcow2"


@pytest.mark.parametrize("name", list(CHAINS))
def test_read_fidelity(tmp_path: Path, name: str) -> None:
    require("qemu-img", "qemu-io", "nbdcopy", "nbdinfo")
    top = build_chain(tmp_path / "images", name)
    reference = qemu_raw(top, tmp_path / "ref.raw")
    theirs = qemu_map(top)
    server = serve_qcow2(tmp_path / "srv", top, read_only=True)
    try:
        uri = server.uri("top")
        tool("nbdcopy", uri, str(tmp_path / "out.raw"))
        ours = nbd_map(uri)
    finally:
        stop_clean(server)
    assert_same((tmp_path / "out.raw").read_bytes(), reference)
    check_allocation(theirs, ours, reference)


# ---------------------------------------------------------------------------------------------
# 2. write fidelity: a seeded random workload through nbdguard, mirrored into a raw model


def make_overlay(directory: Path, cluster: str, compat: str, backing: bool) -> Path:
    """A fresh 12 MiB overlay; with `backing`, over an 8 MiB raw base of patterns and noise
    (so the overlay is larger than its base: past 8 MiB the guest reads zeros)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_noise(directory)
    options = f"cluster_size={cluster},compat={compat}"
    if not backing:
        sh(directory, f"qemu-img create -q -f qcow2 -o {options} top.qcow2 12M")
        return directory / "top.qcow2"
    sh(
        directory,
        "qemu-img create -q -f raw base.raw 8M",
        "qemu-io -f raw -c 'write -P 0x5a 0 3M' -c 'write -P 0xa5 7M 1M' base.raw",
        "dd if=noise.bin of=base.raw bs=64k seek=64 count=16 conv=notrunc status=none",
        f"qemu-img create -q -f qcow2 -o {options} -b base.raw -F raw top.qcow2 12M",
    )
    return directory / "top.qcow2"


def connect(uri: str) -> Handle:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    # a raw export advertises all of these (test_libnbd); a qcow2 export must not lose them
    for capability in (handle.can_flush, handle.can_fua, handle.can_trim, handle.can_zero):
        assert capability(), capability.__name__
    assert not handle.is_read_only()
    return handle


def random_extent(rng: random.Random, size: int) -> tuple[int, int]:
    """(offset, length): mostly odd sizes at odd offsets, sometimes huge, sometimes at the end."""
    length = rng.choice(
        [rng.randrange(1, 600), rng.randrange(1, 9000), rng.randrange(1, 140_000), 333_333]
    )
    offset = size - length if rng.random() < 0.05 else rng.randrange(0, size - length + 1)
    return offset, length


def workload(handle: Handle, model: bytearray, seed: str, ops: int = 400) -> dict[str, int]:
    """Apply `ops` random commands through `handle` and mirror each into `model`; count them."""
    rng = random.Random(seed)
    size = len(model)
    counts = dict.fromkeys(("write", "zero", "zero-no-hole", "trim", "flush", "read", "fua"), 0)
    kinds = ["write", "zero", "zero-no-hole", "trim", "flush", "read"]
    for _ in range(ops):
        kind = rng.choices(kinds, weights=[50, 10, 10, 12, 5, 13])[0]
        offset, length = random_extent(rng, size)
        fua = nbd.CMD_FLAG_FUA if kind != "read" and rng.random() < 0.15 else 0
        counts[kind] += 1
        counts["fua"] += bool(fua)
        if kind == "write":
            data = rng.randbytes(length)
            handle.pwrite(data, offset, fua)
            model[offset : offset + length] = data
        elif kind in ("zero", "zero-no-hole"):
            flags = fua | (nbd.CMD_FLAG_NO_HOLE if kind == "zero-no-hole" else 0)
            handle.zero(length, offset, flags)
            model[offset : offset + length] = bytes(length)
        elif kind == "trim":
            handle.trim(length, offset, fua)
            # after TRIM the range's contents are undefined (NBD spec): adopt what reads back,
            # but everything around it (here: 128 KiB either side) must be untouched
            low, high = max(0, offset - (128 << 10)), min(size, offset + length + (128 << 10))
            got = handle.pread(high - low, low)
            assert got[: offset - low] == model[low:offset], f"trim {offset:#x} hit before"
            tail = offset + length - low
            assert got[tail:] == model[offset + length : high], f"trim {offset:#x} hit after"
            model[offset : offset + length] = got[offset - low : tail]
        elif kind == "flush":
            handle.flush()
        else:
            got = handle.pread(length, offset)
            expected = bytes(model[offset : offset + length])
            assert got == expected, f"read {offset:#x}: {first_difference(got, expected)}"
    return counts


def check_against_model(top: Path, model: bytearray, directory: Path) -> None:
    """`qemu-img check` clean (no errors, no leaks) and the guest view equal to the model."""
    tool("qemu-img", "check", "-f", "qcow2", str(top), cwd=top.parent)
    reference = directory / "model.raw"
    reference.write_bytes(model)
    tool(
        "qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(reference), cwd=top.parent
    )


def serve_workload(directory: Path, top: Path, model: bytearray, seed: str) -> dict[str, int]:
    server = serve_qcow2(directory, top, read_only=False)
    try:
        handle = connect(server.uri("top"))
        counts = workload(handle, model, seed)
        handle.flush()
        handle.shutdown()
    finally:
        stop_clean(server)
    return counts


@pytest.mark.parametrize(
    ("cluster", "compat", "backing"),
    [
        ("4k", "1.1", True),
        ("64k", "1.1", True),
        ("4k", "0.10", True),
        ("64k", "0.10", True),
        ("4k", "1.1", False),
        ("64k", "0.10", False),
    ],
)
def test_write_fidelity(tmp_path: Path, cluster: str, compat: str, backing: bool) -> None:
    require("qemu-img", "qemu-io")
    top = make_overlay(tmp_path / "images", cluster, compat, backing)
    model = bytearray(qemu_raw(top, tmp_path / "before.raw"))
    counts = serve_workload(tmp_path / "srv", top, model, seed=f"{cluster}/{compat}/{backing}")
    assert min(counts.values()) > 0, counts  # every kind of command was exercised
    check_against_model(top, model, tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "cluster-512",
        "compressed-zstd-64k",  # partial writes over compressed clusters
        "extended-l2-64k",  # subclusters: allocated, zero and unallocated within one cluster
        "zero-clusters-over-base",
        "data-file",
        "data-file-raw",
        "depth-3-shrinking",  # past mid's end the base's bytes must stay hidden after COW
    ],
)
def test_write_fidelity_on_built_chain(tmp_path: Path, name: str) -> None:
    """The same workload on the top of some of the read-fidelity chains."""
    require("qemu-img", "qemu-io")
    top = build_chain(tmp_path / "images", name)
    model = bytearray(qemu_raw(top, tmp_path / "before.raw"))
    serve_workload(tmp_path / "srv", top, model, seed=name)
    check_against_model(top, model, tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. internal snapshots: writes to the active layer leave a snapshot's clusters alone


def test_internal_snapshot_survives_writes(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    images = tmp_path / "images"
    images.mkdir()
    write_noise(images)
    sh(
        images,
        "qemu-img create -q -f qcow2 -o cluster_size=4k top.qcow2 8M",
        f"{QIO} -c 'write -P 0x11 0 2M' -c 'write -s noise.bin 3M 1M' -c 'write -z 1M 64k' "
        "top.qcow2",
        "qemu-img snapshot -c snap1 top.qcow2",
        # diverge before nbdguard sees it: some clusters shared (refcount 2), some not
        f"{QIO} -c 'write -P 0x22 1500k 100k' -c 'write -P 0x33 6M 10k' top.qcow2",
    )
    top = images / "top.qcow2"
    snapshot = qemu_raw(top, tmp_path / "snap-before.raw", "-l", "snapshot.name=snap1")
    model = bytearray(qemu_raw(top, tmp_path / "before.raw"))
    assert snapshot != bytes(model)
    serve_workload(tmp_path / "srv", top, model, seed="snapshot")
    check_against_model(top, model, tmp_path)
    listed = tool("qemu-img", "snapshot", "-l", str(top)).stdout
    assert "snap1" in listed, listed
    after = qemu_raw(top, tmp_path / "snap-after.raw", "-l", "snapshot.name=snap1")
    assert_same(after, snapshot)


# ---------------------------------------------------------------------------------------------
# 4. crash consistency: kill -9 during writes; every write acknowledged before a completed
#    FLUSH must survive, and qemu-img check may find leaks but never corruption

SLOT = 3001  # unique bytes per write; slots share 64 KiB clusters but never overlap
STRIDE = 7001


def slot_data(slot: int) -> bytes:
    return random.Random(f"slot {slot}").randbytes(SLOT)


def slot_offset(slot: int) -> int:
    return 777 + slot * STRIDE


def write_until_killed(server: RunningServer, first: int, rng: random.Random) -> list[int]:
    """Keep 16 writes in flight, send a FLUSH every ~40 acknowledged writes, and kill -9 the
    server after a random number of writes (with writes, maybe a FLUSH, still in flight).
    Return the slots acknowledged before the FLUSH that last completed was sent: per the NBD
    spec, a FLUSH covers the writes completed before it, not those still in flight."""
    handle = nbd.NBD()
    handle.connect_uri(server.uri("top"))
    kill_after = rng.randrange(100, 700)
    in_flight: dict[int, int] = {}  # cookie -> slot
    acknowledged: list[int] = []
    durable: list[int] = []
    flush: tuple[int, list[int]] | None = None  # (cookie, what it covers)
    slot = first
    while True:
        while len(in_flight) < 16:
            in_flight[handle.aio_pwrite(slot_data(slot), slot_offset(slot))] = slot
            slot += 1
        if slot - first >= kill_after:
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=10)
            return durable
        if flush is None and len(acknowledged) - len(durable) >= 40:
            flush = (handle.aio_flush(), list(acknowledged))
        handle.poll(-1)
        for cookie in [c for c in in_flight if handle.aio_command_completed(c)]:
            acknowledged.append(in_flight.pop(cookie))
        if flush is not None and handle.aio_command_completed(flush[0]):
            durable = flush[1]
            flush = None


def qemu_check_after_crash(top: Path) -> int:
    result = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(top)], capture_output=True, text=True
    )
    assert result.returncode in (0, 3), result.stdout + result.stderr  # 2: corruption
    return result.returncode


@pytest.mark.parametrize("cluster_size", ["4k", "64k"])
def test_kill_9_keeps_flushed_writes(tmp_path: Path, cluster_size: str) -> None:
    require("qemu-img", "qemu-io")
    images = tmp_path / "images"
    images.mkdir()
    sh(
        images,
        "qemu-img create -q -f raw base.raw 32M",
        "qemu-io -f raw -c 'write -P 0x5c 0 32M' base.raw",
        f"qemu-img create -q -f qcow2 -o cluster_size={cluster_size} -b base.raw -F raw "
        "top.qcow2 32M",
    )
    top = images / "top.qcow2"
    rng = random.Random(2024)
    durable: list[int] = []
    for round_number in range(4):
        server = serve_qcow2(tmp_path / f"run{round_number}", top, read_only=False)
        handle = nbd.NBD()
        handle.connect_uri(server.uri("top"))
        for slot in durable:  # flushed in earlier rounds, then the server was killed
            assert handle.pread(SLOT, slot_offset(slot)) == slot_data(slot), slot
        handle.shutdown()
        durable += write_until_killed(server, round_number * 1000, rng)
        qemu_check_after_crash(top)
    assert len(durable) > 100, len(durable)
    data = qemu_raw(top, tmp_path / "after.raw")
    for slot in durable:
        assert data[slot_offset(slot) : slot_offset(slot) + SLOT] == slot_data(slot), slot
    gap = slot_offset(999)  # never written: still the base's bytes
    assert data[gap : gap + SLOT] == b"\x5c" * SLOT
    tool("qemu-img", "check", "-r", "leaks", "-f", "qcow2", str(top), ok=(0, 3))
    assert qemu_check_after_crash(top) == 0  # once leaks are repaired, nothing else is wrong


# ---------------------------------------------------------------------------------------------
# 5. a real QEMU client reading through nbdguard


def test_qemu_img_compare_through_nbdguard(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    top = build_chain(tmp_path / "images", "depth-3-growing")
    server = serve_qcow2(tmp_path / "srv", top, read_only=True)
    try:
        uri = server.uri("top")
        info = json.loads(tool("qemu-img", "info", "-f", "raw", "--output=json", uri).stdout)
        assert info["virtual-size"] == 8 * MiB
        # -U: nbdguard may hold the images' locks; qemu only reads them here
        tool("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", uri, str(top), cwd=top.parent)
        read = tool("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xb6 4000000 300000", uri)
        assert "read 300000/300000" in read.stdout, read.stdout
    finally:
        stop_clean(server)
