"""The raw driver and the pinned opener, on real files in tmp_path."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nbdguard.errors import ExportOpenError
from nbdguard.storage import fileops
from nbdguard.storage.device import DATA, HOLE_ZERO
from nbdguard.storage.pinned import open_pinned
from nbdguard.storage.raw import RawImage


def make_image(path: Path, size: int, data: bytes = b"") -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(data)
    return path


def open_raw(path: Path, read_only: bool = False) -> RawImage:
    return RawImage(open_pinned(path, read_only=read_only, export="t"))


def test_read_write_roundtrip_and_file_contents(tmp_path: Path) -> None:
    image = open_raw(make_image(tmp_path / "a.raw", 1 << 20))
    image.pwrite(b"\xab" * 4096, 8192)
    assert bytes(image.pread(8192, 4096)) == b"\xab" * 4096
    image.flush()
    with open(tmp_path / "a.raw", "rb") as handle:
        handle.seek(8192)
        assert handle.read(4096) == b"\xab" * 4096
    image.close()


def test_unaligned_size_tail_is_readable_and_writable(tmp_path: Path) -> None:
    image = open_raw(make_image(tmp_path / "odd.raw", 1000))
    assert image.size == 1000
    image.pwrite(b"xyz", 997)
    assert bytes(image.pread(990, 10)) == bytes(7) + b"xyz"
    image.close()
    assert (tmp_path / "odd.raw").stat().st_size == 1000


def test_empty_file(tmp_path: Path) -> None:
    image = open_raw(make_image(tmp_path / "empty.raw", 0))
    assert image.size == 0 and bytes(image.pread(0, 0)) == b""
    image.close()


def test_write_zeroes_and_trim_make_holes(tmp_path: Path) -> None:
    path = make_image(tmp_path / "z.raw", 1 << 20)
    image = open_raw(path)
    image.pwrite(b"\x11" * (1 << 20), 0)
    image.write_zeroes(65536, 65536, may_trim=True, fast=False)
    assert bytes(image.pread(65536, 65536)) == bytes(65536)
    image.write_zeroes(0, 4096, may_trim=False, fast=False)
    assert bytes(image.pread(0, 4096)) == bytes(4096)
    image.trim(262144, 131072)
    status = image.block_status(0, 1 << 20, 100)
    assert sum(length for length, _ in status) == 1 << 20
    assert (65536, HOLE_ZERO) in status or any(f == HOLE_ZERO for _, f in status)
    image.close()


def test_block_status_reports_holes_and_data(tmp_path: Path) -> None:
    path = make_image(tmp_path / "s.raw", 1 << 20)
    image = open_raw(path)
    image.pwrite(b"\x01" * 4096, 512 * 1024)
    image.flush()
    status = image.block_status(0, 1 << 20, 100)
    assert status[0] == (512 * 1024, HOLE_ZERO)
    assert status[1][1] == DATA
    assert sum(length for length, _ in status) == 1 << 20
    assert image.block_status(0, 1 << 20, 1) == [(512 * 1024, HOLE_ZERO)]
    image.close()


def test_refuses_directories_and_fifos(tmp_path: Path) -> None:
    with pytest.raises(ExportOpenError, match="not a regular file"):
        open_pinned(tmp_path, read_only=True, export="dir")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # O_RDWR on a FIFO does not block on Linux, so this reaches the fstat check.
    with pytest.raises(ExportOpenError, match="not a regular file"):
        open_pinned(fifo, read_only=False, export="fifo")


def test_missing_file_names_export_and_path(tmp_path: Path) -> None:
    with pytest.raises(ExportOpenError, match=r"export 'vm9'.*nope\.raw.*No such file"):
        open_pinned(tmp_path / "nope.raw", read_only=False, export="vm9")


def test_symlink_is_resolved_once(tmp_path: Path) -> None:
    target = make_image(tmp_path / "real.raw", 4096)
    (tmp_path / "link.raw").symlink_to(target)
    opened = open_pinned(tmp_path / "link.raw", read_only=True, export="l")
    assert opened.path == target.resolve()
    opened.close()


def test_second_writer_is_refused_but_readers_share(tmp_path: Path) -> None:
    path = make_image(tmp_path / "l.raw", 4096)
    first = open_pinned(path, read_only=True, export="a")
    second = open_pinned(path, read_only=True, export="b")  # readers share
    with pytest.raises(ExportOpenError, match="locked"):
        open_pinned(path, read_only=False, export="c")
    first.close()
    second.close()
    writer = open_pinned(path, read_only=False, export="d")
    with pytest.raises(ExportOpenError, match="locked"):
        open_pinned(path, read_only=True, export="e")
    writer.close()


def test_qemu_io_cannot_write_while_we_serve(tmp_path: Path) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    path = make_image(tmp_path / "q.raw", 1 << 20)
    command = ["qemu-io", "-f", "raw", "-c", "write 0 512", str(path)]
    writer = open_pinned(path, read_only=True, export="q")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and '"write" lock' in result.stderr
    writer.close()
    assert subprocess.run(command, capture_output=True).returncode == 0


def test_fast_zero_without_fallocate_support_is_enotsup(tmp_path: Path) -> None:
    image = open_raw(make_image(tmp_path / "f.raw", 1 << 20))
    image._unsupported = {fileops.punch_hole, fileops.zero_range}  # as on a file system without
    with pytest.raises(OSError) as caught:
        image.write_zeroes(0, 4096, may_trim=True, fast=True)
    assert caught.value.errno == errno.ENOTSUP
    image.pwrite(b"\xff" * 4096, 0)
    image.write_zeroes(0, 4096, may_trim=True, fast=False)  # falls back to writing zeroes
    assert bytes(image.pread(0, 4096)) == bytes(4096)
    image.close()
