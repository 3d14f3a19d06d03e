"""The sector-zero guard layer over a real raw image file."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from nbdguard.guard.sector0 import GuardPolicy, HeaderWriteBlocked, Sector0Guard
from nbdguard.guard.signatures import detect_header
from nbdguard.storage.locks import SectorLock
from nbdguard.storage.pinned import open_pinned
from nbdguard.storage.raw import RawImage
from tests.guard.samples import NOT_DETECTED_BY_QEMU, QEMU_HEADERS, STRICT_ONLY


class Guarded:
    def __init__(
        self,
        path: Path,
        size: int = 1 << 20,
        rules: str = "qemu",
        allowed: frozenset[str] = frozenset(),
        initial: bytes = b"",
    ) -> None:
        with open(path, "wb") as handle:
            handle.truncate(size)
            handle.write(initial)
        self.path = path
        opened = open_pinned(path, read_only=False, export="t")
        self.rmw = 0
        self.device = Sector0Guard(
            RawImage(opened),
            GuardPolicy(rules, allowed),
            file_lock=SectorLock(opened.fd),
            on_rmw=self._count,
        )

    def _count(self) -> None:
        self.rmw += 1

    def file(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture
def guarded(tmp_path: Path) -> Guarded:
    return Guarded(tmp_path / "g.raw")


@pytest.mark.parametrize(("fmt", "header"), sorted(QEMU_HEADERS.items()))
def test_whole_sector_header_write_is_refused(guarded: Guarded, fmt: str, header: bytes) -> None:
    before = guarded.file()
    with pytest.raises(HeaderWriteBlocked) as caught:
        guarded.device.pwrite(header + b"tail" * 1024, 0)
    assert caught.value.errno == 1 and caught.value.format == fmt
    assert caught.value.sector_head == header[:16]
    assert guarded.file() == before  # nothing written, not even past sector 0


@pytest.mark.parametrize(("fmt", "header"), sorted(QEMU_HEADERS.items()))
def test_byte_by_byte_in_random_order_fails_at_the_completing_byte(
    guarded: Guarded, fmt: str, header: bytes
) -> None:
    order = [i for i in range(512) if header[i]]
    random.Random(fmt).shuffle(order)
    refused = []
    for index in order:
        try:
            guarded.device.pwrite(header[index : index + 1], index)
        except HeaderWriteBlocked:
            refused.append(index)
    final = guarded.file()[:512]
    assert detect_header(final, "qemu") is None
    missing = [i for i in order if final[i] != header[i]]
    assert missing == refused and len(refused) >= 1


@pytest.mark.parametrize(("fmt", "header"), sorted(QEMU_HEADERS.items()))
def test_unaligned_chunks_straddling_512(guarded: Guarded, fmt: str, header: bytes) -> None:
    payload = header + b"\xee" * 300
    cuts = [0, 3, 61, 250, 509, len(payload)]
    for start, stop in itertools.pairwise(cuts):
        try:
            guarded.device.pwrite(payload[start:stop], start)
        except HeaderWriteBlocked as blocked:
            assert blocked.format == fmt
            data = guarded.file()
            assert detect_header(data[:512], "qemu") is None
            if stop > 512:
                assert data[512:stop] == bytes(stop - 512)  # the refused tail was not written
            return
    pytest.fail("the header was completed without a refusal")


def test_last_bytes_supplied_by_write_zeroes_or_trim(tmp_path: Path) -> None:
    for kind in ("zero", "trim"):
        g = Guarded(tmp_path / f"{kind}.raw", initial=b"LUKS\xba\xbe\xff\x01")
        assert detect_header(g.file()[:512], "qemu") is None  # version 0xff01
        with pytest.raises(HeaderWriteBlocked):
            if kind == "zero":
                g.device.write_zeroes(6, 1, may_trim=True, fast=False)
            else:
                g.device.trim(6, 1)
        assert g.file()[:8] == b"LUKS\xba\xbe\xff\x01"


def test_trim_of_sector_0_reads_back_as_checked(guarded: Guarded) -> None:
    guarded.device.pwrite(b"\x11" * 4096, 0)
    guarded.device.trim(0, 4096)
    assert guarded.file()[:4096] == bytes(4096)


@pytest.mark.parametrize(("name", "content"), sorted(NOT_DETECTED_BY_QEMU.items()))
def test_real_content_is_written(guarded: Guarded, name: str, content: bytes) -> None:
    guarded.device.pwrite(content, 0)
    assert guarded.file()[:512] == content


def test_strict_rules_refuse_more(tmp_path: Path) -> None:
    g = Guarded(tmp_path / "s.raw", rules="strict")
    for fmt, header in STRICT_ONLY.items():
        with pytest.raises(HeaderWriteBlocked) as caught:
            g.device.pwrite(header, 0)
        assert caught.value.format == fmt


def test_allowed_format_is_written(tmp_path: Path) -> None:
    g = Guarded(tmp_path / "l.raw", allowed=frozenset({"luks"}))
    g.device.pwrite(QEMU_HEADERS["luks"], 0)
    assert g.file()[:512] == QEMU_HEADERS["luks"]
    with pytest.raises(HeaderWriteBlocked):
        g.device.pwrite(QEMU_HEADERS["qcow2"], 0)


def test_byte_identical_rewrite_of_an_existing_header_is_allowed(tmp_path: Path) -> None:
    header = QEMU_HEADERS["qcow2"]
    g = Guarded(tmp_path / "e.raw", initial=header)
    assert g.device.existing_header() == "qcow2"
    g.device.pwrite(header[:64], 0)  # unchanged bytes: allowed
    with pytest.raises(HeaderWriteBlocked):
        g.device.pwrite(b"\x01", 100)  # a change that keeps the header: refused
    g.device.pwrite(bytes(4), 0)  # destroying the header is fine
    assert g.device.existing_header() is None


def test_requests_past_sector_0_skip_the_guard(guarded: Guarded) -> None:
    guarded.device.pwrite(QEMU_HEADERS["qcow2"], 512)
    guarded.device.write_zeroes(512, 4096, may_trim=True, fast=False)
    guarded.device.trim(4096, 4096)
    assert guarded.rmw == 0
    guarded.device.pwrite(b"x", 0)
    assert guarded.rmw == 1


def test_tiny_export_smaller_than_a_sector(tmp_path: Path) -> None:
    g = Guarded(tmp_path / "t.raw", size=100)
    with pytest.raises(HeaderWriteBlocked):
        g.device.pwrite(b"QFI\xfb\0\0\0\x03", 0)
    g.device.pwrite(b"hello", 95)
    assert g.file() == bytes(95) + b"hello"


def test_only_writes_past_sector_0_may_be_applied_in_parts(guarded: Guarded) -> None:
    assert guarded.device.inner.partial_write_unit(0) == 1  # raw bytes: parts end anywhere
    assert guarded.device.partial_write_unit(0) == 0
    assert guarded.device.partial_write_unit(511) == 0
    assert guarded.device.partial_write_unit(512) == 1
