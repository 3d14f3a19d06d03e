"""The harness's own parsers and writers, without booting anything: a wrong module order or a
malformed initramfs would otherwise show up only as a guest that hangs or panics."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.vm.harness import Cpio, VMError, extract_vmlinux, modinfo, resolve_modules


def fake_module(info: dict[str, str]) -> bytes:
    """A minimal ELF64 relocatable with a section-name table and a .modinfo section."""
    strtab = b"\0.shstrtab\0.modinfo\0"
    body = b"".join(f"{key}={value}".encode() + b"\0" for key, value in info.items())
    header_size, entry = 64, 64
    strtab_off = header_size
    body_off = strtab_off + len(strtab)
    shoff = body_off + len(body)
    header = bytearray(header_size)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, entry, 3, 1)

    def section(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQ", name, 1, 0, 0, offset, size).ljust(entry, b"\0")

    sections = section(0, 0, 0) + section(1, strtab_off, len(strtab))
    sections += section(11, body_off, len(body))
    return bytes(header) + strtab + body + sections


def write_modules(directory: Path, modules: dict[str, str]) -> dict[str, Path]:
    index = {}
    for name, depends in modules.items():
        path = directory / f"{name}.ko"
        path.write_bytes(fake_module({"license": "GPL", "depends": depends, "name": name}))
        index[name] = path
    return index


def test_modinfo_reads_depends() -> None:
    info = modinfo(fake_module({"depends": "jbd2,mbcache", "name": "ext4"}))
    assert info["depends"] == "jbd2,mbcache"
    assert info["name"] == "ext4"


def test_modinfo_refuses_what_is_not_a_module() -> None:
    with pytest.raises(VMError, match="ELF64"):
        modinfo(b"MZ" + bytes(100))


def test_modules_resolve_dependencies_first(tmp_path: Path) -> None:
    index = write_modules(
        tmp_path,
        {"ext4": "jbd2,mbcache,crc16", "jbd2": "", "mbcache": "", "crc16": "", "nbd": ""},
    )
    order = [path.stem for path in resolve_modules(index, ["nbd", "ext4"])]
    assert order == ["nbd", "jbd2", "mbcache", "crc16", "ext4"]


def test_missing_dependency_is_named(tmp_path: Path) -> None:
    index = write_modules(tmp_path, {"virtio_pci": "virtio,virtio_ring", "virtio": ""})
    with pytest.raises(VMError, match="virtio_ring"):
        resolve_modules(index, ["virtio_pci"])


def test_dependency_cycle_is_refused(tmp_path: Path) -> None:
    index = write_modules(tmp_path, {"a": "b", "b": "a"})
    with pytest.raises(VMError, match="cycle"):
        resolve_modules(index, ["a"])


def test_vmlinux_is_found_past_a_false_xz_magic() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    bzimage = b"setup" + b"\xfd7zXZ\x00garbage" + lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert extract_vmlinux(bzimage + b"trailer") == elf


def test_bzimage_without_xz_payload_is_refused() -> None:
    with pytest.raises(VMError, match="xz"):
        extract_vmlinux(b"\x1f\x8b" + bytes(1000))


def test_cpio_unpacks_with_a_real_cpio(tmp_path: Path) -> None:
    if shutil.which("busybox") is None:
        pytest.skip("busybox is not installed")
    archive = Cpio()
    archive.file("/usr/bin/tool", b"#!/bin/sh\necho odd-sized body\n")
    archive.file("/etc/conf", b"x" * 4097, 0o644)
    archive.symlink("/sbin", "usr/sbin")
    (tmp_path / "out").mkdir()
    subprocess.run(
        ["busybox", "cpio", "-i", "-d"],
        input=archive.finish(),
        cwd=tmp_path / "out",
        check=True,
        capture_output=True,
    )
    out = tmp_path / "out"
    assert (out / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho odd-sized body\n"
    assert (out / "usr/bin/tool").stat().st_mode & 0o777 == 0o755
    assert (out / "etc/conf").read_bytes() == b"x" * 4097
    assert (out / "sbin").readlink() == Path("usr/sbin")
