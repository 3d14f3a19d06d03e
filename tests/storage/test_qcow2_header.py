"""The qcow2 header parser: real headers from qemu-img, each refusal rule, and hostile
mutations that must be refused with a reason, quickly and without large allocations."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdguard.storage.qcow2.header import (
    EXTENDED_L2,
    HeaderError,
    Qcow2Header,
    parse_header,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def made(tmp_path: Path, *args: str, size: str = "64M") -> bytes:
    image = tmp_path / "img.qcow2"
    image.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *args, str(image), size],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    return image.read_bytes()


def parse(data: bytes) -> Qcow2Header:
    return parse_header(data[: 2 << 20], len(data))


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_a_plain_v3_image(tmp_path: Path) -> None:
    header = parse(made(tmp_path))
    assert (header.version, header.cluster_size, header.size) == (3, 65536, 64 << 20)
    assert header.backing_name is None and header.backing_format is None
    assert header.compression == "zlib" and header.refcount_order == 4


def test_backing_name_and_format_come_from_the_header(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    header = parse(made(tmp_path, "-b", "base.raw", "-F", "raw", "-o", "compat=0.10"))
    assert (header.version, header.backing_name, header.backing_format) == (2, "base.raw", "raw")


def test_features_are_decoded(tmp_path: Path) -> None:
    header = parse(
        made(tmp_path, "-o", "extended_l2=on,compression_type=zstd,data_file=d.raw,refcount_bits=8")
    )
    assert header.extended_l2 and header.incompatible & EXTENDED_L2
    assert header.l2_entries == 65536 // 16
    assert header.compression == "zstd"
    assert header.data_file_name == "d.raw"
    assert header.refcount_order == 3


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "reason", "words"),
    [
        (0, ">I", 0x51464900, "bad_header", "magic"),
        (4, ">I", 4, "bad_header", "version 4"),
        (20, ">I", 8, "bad_header", "cluster_bits 8"),
        (20, ">I", 22, "bad_header", "cluster_bits 22"),
        (32, ">I", 1, "encrypted", "crypt_method 1"),
        (36, ">I", 4_194_305, "bad_header", "L1 table"),
        (36, ">I", 0, "bad_header", "too small"),
        (40, ">Q", 12345, "bad_header", "not cluster-aligned"),
        (48, ">Q", 1 << 40, "bad_header", "past the end"),
        (56, ">I", 0, "bad_header", "refcount table"),
        (56, ">I", 129, "bad_header", "8 MiB"),
        (60, ">I", 65537, "bad_header", "snapshots"),
        (72, ">Q", 1 << 10, "unsupported_feature", "0x400"),
        (96, ">I", 7, "bad_header", "refcount_order"),
        (100, ">I", 100, "bad_header", "header_length"),
        (100, ">I", 1 << 17, "bad_header", "header_length"),
    ],
)
def test_each_rule_refuses_with_its_reason(
    tmp_path: Path, offset: int, fmt: str, value: int, reason: str, words: str
) -> None:
    with pytest.raises(HeaderError) as caught:
        parse(patched(made(tmp_path), offset, fmt, value))
    assert caught.value.reason == reason
    assert words in caught.value.detail


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    data = made(tmp_path)
    for length in (0, 3, 50, 71, 100):
        with pytest.raises(HeaderError) as caught:
            parse_header(data[:length], length)
        assert caught.value.reason == "bad_header"


def test_backing_name_outside_cluster_zero_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    data = made(tmp_path, "-b", "base.raw", "-F", "raw")
    with pytest.raises(HeaderError, match="backing file name"):
        parse(patched(data, 16, ">I", 70000))


def test_a_long_backing_format_extension_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    data = made(tmp_path, "-b", "base.raw", "-F", "raw")
    start = data.index(struct.pack(">I", 0xE2792ACA))
    with pytest.raises(HeaderError) as caught:
        parse(patched(data, start + 4, ">I", 16))
    assert caught.value.reason == "bad_header"


HEADER_FIELDS = [
    (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"), (36, ">I"), (40, ">Q"),
    (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q"), (72, ">Q"), (88, ">Q"), (96, ">I"),
    (100, ">I"), (104, ">B"), (112, ">I"), (116, ">I"),
]  # fmt: skip
_BASE: dict[str, bytes] = {}


def base_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if "data" not in _BASE:
        directory = tmp_path_factory.mktemp("fuzz")
        (directory / "base.raw").write_bytes(bytes(4096))
        _BASE["data"] = made(directory, "-b", "base.raw", "-F", "raw", size="1G")
    return _BASE["data"]


def interesting() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 2**64 - 1),
        st.sampled_from([0, 1, 7, 8, 9, 21, 104, 512, 65536, 2**31, 2**32 - 1, 2**63]),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(HEADER_FIELDS), interesting()), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(0, 70000)),
)
def test_mutated_headers_parse_or_are_refused_with_a_reason(
    tmp_path_factory: pytest.TempPathFactory,
    mutations: list[tuple[tuple[int, str], int]],
    cut: int | None,
) -> None:
    data = bytearray(base_image(tmp_path_factory))
    for (offset, fmt), value in mutations:
        struct.pack_into(fmt, data, offset, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
    if cut is not None:
        del data[cut:]
    try:
        header = parse_header(bytes(data[: 2 << 20]), len(data))
    except HeaderError as err:
        assert err.reason in {"bad_header", "encrypted", "unsupported_feature"}
        return
    # Accepted: every table it names lies inside the file and within QEMU's limits.
    assert header.l1_table_offset + header.l1_size * 8 <= len(data)
    assert header.l1_size <= 4 << 20
    refcount_end = header.refcount_table_offset + header.refcount_table_clusters * (
        header.cluster_size
    )
    assert refcount_end <= len(data)
    assert 9 <= header.cluster_bits <= 21
