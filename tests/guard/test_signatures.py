"""The header rule sets, on sectors built byte by byte from the reference table."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdguard.guard.signatures import KNOWN_FORMATS, RULE_SETS, detect_header
from tests.guard.samples import (
    MORE_QEMU_HEADERS,
    NOT_DETECTED_BY_QEMU,
    QEMU_HEADERS,
    STRICT_ALSO_QCOW2,
    STRICT_ONLY,
    sector,
)


@pytest.mark.parametrize("rule_set", ["qemu", "strict"])
@pytest.mark.parametrize(("fmt", "data"), sorted(QEMU_HEADERS.items()))
def test_qemu_headers_are_detected_by_both_sets(fmt: str, data: bytes, rule_set: str) -> None:
    assert detect_header(data, rule_set) == fmt


@pytest.mark.parametrize(
    ("fmt", "data"), [(fmt, data) for fmt, items in MORE_QEMU_HEADERS.items() for data in items]
)
def test_more_qemu_variants(fmt: str, data: bytes) -> None:
    assert detect_header(data, "qemu") == fmt


@pytest.mark.parametrize(("fmt", "data"), sorted(STRICT_ONLY.items()))
def test_strict_only_rules(fmt: str, data: bytes) -> None:
    assert detect_header(data, "strict") == fmt
    assert detect_header(data, "qemu") is None


def test_libvirt_qcow_rule_ignores_the_fourth_magic_byte() -> None:
    assert detect_header(STRICT_ALSO_QCOW2, "qemu") is None
    assert detect_header(STRICT_ALSO_QCOW2, "strict") == "qcow2"


@pytest.mark.parametrize(("name", "data"), sorted(NOT_DETECTED_BY_QEMU.items()))
def test_real_content_and_near_misses_pass_qemu_rules(name: str, data: bytes) -> None:
    assert detect_header(data, "qemu") is None, name


@pytest.mark.parametrize("name", ["zeros", "mbr", "gpt-protective-mbr", "fat", "ntfs", "luks2"])
def test_real_content_passes_strict_rules(name: str) -> None:
    assert detect_header(NOT_DETECTED_BY_QEMU[name], "strict") is None


def test_allowed_formats_are_skipped() -> None:
    luks = QEMU_HEADERS["luks"]
    assert detect_header(luks, "qemu", frozenset({"luks"})) is None
    assert detect_header(luks, "strict", frozenset({"luks"})) is None
    assert detect_header(QEMU_HEADERS["qcow2"], "qemu", frozenset({"luks"})) == "qcow2"


def test_short_input_is_zero_padded() -> None:
    assert detect_header(b"QFI\xfb", "qemu") is None  # version reads as 0
    assert detect_header(b"QFI\xfb", "strict") == "qcow2"
    assert detect_header(b"QFI\xfb\0\0\0\x02", "qemu") == "qcow2"
    assert detect_header(b"", "strict") is None


def test_only_the_first_512_bytes_count() -> None:
    assert detect_header(bytes(512) + b"QFI\xfb\0\0\0\x03", "strict") is None
    vdi_split = bytearray(QEMU_HEADERS["vdi"])
    assert detect_header(bytes(vdi_split[:66]), "qemu") is None  # signature cut in half


def test_unknown_rule_set() -> None:
    with pytest.raises(ValueError, match="rule set"):
        detect_header(bytes(512), "probe-everything")


def test_every_rule_names_a_known_format() -> None:
    for rules in RULE_SETS.values():
        for rule in rules:
            assert rule.format in KNOWN_FORMATS and rule.description


def test_memoryview_and_bytearray_inputs() -> None:
    data = QEMU_HEADERS["vhdx"]
    assert detect_header(memoryview(data), "qemu") == "vhdx"
    assert detect_header(bytearray(data), "qemu") == "vhdx"


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=700), st.sampled_from(["qemu", "strict"]))
def test_random_sectors_never_raise_and_only_the_prefix_matters(data: bytes, rules: str) -> None:
    assert detect_header(data, rules) == detect_header(data[:512], rules)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_sectors_without_any_magic_are_not_headers(data: bytes) -> None:
    raw = bytearray(data)
    raw[0] = 0  # not a magic, not '#', ' ' or 'v'
    raw[64:72] = bytes(8)  # no vdi signature
    assert detect_header(bytes(raw), "strict") is None


def test_sector_helper_places_bytes() -> None:
    assert sector((510, b"\x55\xaa"))[510:] == b"\x55\xaa"
