"""Block status of a qcow2 chain, nbdguard next to qemu-nbd on the same images:
`nbdinfo --map` for base:allocation and qemu:allocation-depth must agree."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, require, start_server

pytestmark = pytest.mark.interop


def sh(command: str, cwd: Path) -> None:
    subprocess.run(command, shell=True, check=True, cwd=cwd, capture_output=True)


def make_chain(directory: Path) -> Path:
    """raw base (8 MiB) <- mid.qcow2 (8 MiB) <- top.qcow2 (10 MiB, 4 KiB clusters)."""
    directory.mkdir(parents=True, exist_ok=True)
    for command in (
        "qemu-img create -f raw base.raw 8M",
        "qemu-io -f raw -c 'write -P 1 0 1M' -c 'write -P 5 7M 4k' base.raw",
        "qemu-img create -f qcow2 -b base.raw -F raw mid.qcow2 8M",
        "qemu-io -f qcow2 -c 'write -P 2 2M 1M' -c 'write -z 7M 64k' mid.qcow2",
        "qemu-img create -f qcow2 -o cluster_size=4k -b mid.qcow2 -F qcow2 top.qcow2 10M",
        "qemu-io -f qcow2 -c 'write -P 3 4M 1M' -c 'write -z 512k 64k' "
        "-c 'write -P 4 9M 12k' top.qcow2",
    ):
        sh(command, directory)
    return directory / "top.qcow2"


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[str]:
    """qemu-nbd -A serving the same chain (persistent, read-only) on a Unix socket."""
    require("qemu-nbd", "qemu-img", "qemu-io")
    top = make_chain(tmp_path / "images")
    sock = tmp_path / "qemu.sock"
    process = subprocess.Popen(
        ["qemu-nbd", "-t", "-r", "-A", "-f", "qcow2", "-k", str(sock), str(top)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline and process.poll() is None, "qemu-nbd did not start"
        time.sleep(0.05)
    yield f"nbd+unix:///?socket={sock}"
    process.terminate()
    process.wait()


def nbd_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    result = subprocess.run(
        ["nbdinfo", "--json", f"--map={context}", uri], check=True, capture_output=True, text=True
    )
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(result.stdout)]


def per_block(extents: list[tuple[int, int, int]], block: int = 4096) -> list[int]:
    """The extent type of every block: robust to how either server splits or merges."""
    out: list[int] = []
    for offset, length, kind in extents:
        assert offset == len(out) * block
        out += [kind] * (length // block)
    return out


@pytest.mark.parametrize("context", ["base:allocation", "qemu:allocation-depth"])
def test_maps_agree_with_qemu_nbd(tmp_path: Path, qemu_nbd: str, context: str) -> None:
    require("nbdinfo")
    top = tmp_path / "images" / "top.qcow2"
    server = start_server(
        tmp_path / "srv", [ExportSpec("top", image=top, format="qcow2", read_only=True)]
    )
    try:
        ours = per_block(nbd_map(server.uri("top"), context))
        theirs = per_block(nbd_map(qemu_nbd, context))
    finally:
        assert server.stop() == 0
    assert len(ours) == len(theirs) == (10 << 20) // 4096
    assert ours == theirs


def test_allocation_depth_names_the_layer(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-img", "qemu-io")
    top = make_chain(tmp_path / "images")
    server = start_server(
        tmp_path / "srv", [ExportSpec("top", image=top, format="qcow2", read_only=True)]
    )
    try:
        depth = per_block(nbd_map(server.uri("top"), "qemu:allocation-depth"))
    finally:
        assert server.stop() == 0
    block = 4096
    assert depth[(4 << 20) // block] == 1  # written in top
    assert depth[(512 << 10) // block] == 1  # zeroed in top
    assert depth[(2 << 20) // block] == 2  # written in mid
    assert depth[0] == 3  # only the raw base holds it
    assert depth[(9 << 20) // block] == 1
    assert depth[(9 << 20) // block + 4] == 2  # past mid's end: QEMU counts it as mid's
