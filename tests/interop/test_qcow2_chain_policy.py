"""qcow2 exports with pinned backing chains: which files an image may make nbdguard open.

Every refusal is checked through the operator's tools: `nbdguard check-config` (exit 1, the
export, the layer, the path and `reason=LABEL` on stderr) and `nbdguard serve` (a
`chain.refused` JSON log line, `nbdguard_chain_refused_total`, `nbdguard_export_up` 0,
`/healthz` 503, the other exports still served). The images are made with qemu-img and,
where qemu-img will not write what a hostile or old image could hold, patched by hand; each
maker checks (with qemu-img info or by reading the header back) that the image says what
the case claims. A hypothesis test feeds mutated headers to check-config in-process.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.interop.conftest import ROOT, ExportSpec, require, sample, start_server

pytestmark = pytest.mark.interop

EXPORT = "vm-chain"  # a name that appears nowhere else in the messages
MiB = 1 << 20

# qcow2 header layout (docs/interop/qcow2.txt): offsets of the fields the tests touch
BACKING_FILE_OFFSET = 8  # u64
BACKING_FILE_SIZE = 16  # u32
CLUSTER_BITS = 20  # u32
CRYPT_METHOD = 32  # u32
INCOMPATIBLE = 72  # u64, v3 only
HEADER_LENGTH = 100  # u32, v3 only
EXT_BACKING_FORMAT = 0xE2792ACA
CORRUPT_BIT = 1 << 1
UNKNOWN_INCOMPATIBLE_BIT = 1 << 10

Keys = dict[str, object]


# ---------------------------------------------------------------- images and their headers


def sh(*command: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stderr}")
    return result


def make_raw(d: Path, name: str, size: int = MiB) -> Path:
    sh("qemu-img", "create", "-q", "-f", "raw", name, str(size), cwd=d)
    return d / name


def make_qcow2(
    d: Path, name: str, backing: str | None = None, fmt: str | None = "raw", size: int = MiB
) -> Path:
    """A qcow2 image; with a backing name it is written as given (-u: nothing is opened)."""
    command = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        command += ["-u", "-b", backing]
        if fmt is not None:
            command += ["-F", fmt]
    sh(*command, name, str(size), cwd=d)
    return d / name


def qemu_info(image: Path) -> dict[str, object]:
    """`qemu-img info` of one image without opening its backing chain or taking locks."""
    out = sh("qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(image), cwd=image.parent)
    info: dict[str, object] = json.loads(out.stdout)
    return info


def header_u32(image: Path, offset: int) -> int:
    with open(image, "rb") as handle:
        handle.seek(offset)
        return int.from_bytes(handle.read(4), "big")


def header_u64(image: Path, offset: int) -> int:
    with open(image, "rb") as handle:
        handle.seek(offset)
        return int.from_bytes(handle.read(8), "big")


def set_u32(image: Path, offset: int, value: int) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(value.to_bytes(4, "big"))


def set_u64(image: Path, offset: int, value: int) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(value.to_bytes(8, "big"))


def backing_name(image: Path) -> str:
    """The backing file name exactly as stored in the header (read by hand: qemu-img info
    would try to open names such as json:{...})."""
    data = image.read_bytes()
    offset = int.from_bytes(data[BACKING_FILE_OFFSET : BACKING_FILE_OFFSET + 8], "big")
    size = int.from_bytes(data[BACKING_FILE_SIZE : BACKING_FILE_SIZE + 4], "big")
    return data[offset : offset + size].decode()


def extensions(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, length) of each header extension of a v3 image, end marker excluded."""
    at = int.from_bytes(data[HEADER_LENGTH : HEADER_LENGTH + 4], "big")
    found = []
    while at + 8 <= len(data):
        kind, length = struct.unpack_from(">II", data, at)
        if kind == 0:
            break
        found.append((at, kind, length))
        at += 8 + (length + 7) // 8 * 8
    return found


def drop_backing_format(image: Path) -> None:
    """Remove the backing-format extension, as in images written before QEMU required one
    (qemu-img 7.2 refuses `create -b` and `rebase -u -b` without -F, and `amend` cannot
    clear it). The other extensions move up; the backing name stays where it is."""
    data = bytearray(image.read_bytes())
    header_length = int.from_bytes(data[HEADER_LENGTH : HEADER_LENGTH + 4], "big")
    name_at = int.from_bytes(data[BACKING_FILE_OFFSET : BACKING_FILE_OFFSET + 8], "big")
    kept = b"".join(
        bytes(data[at : at + 8 + (length + 7) // 8 * 8])
        for at, kind, length in extensions(bytes(data))
        if kind != EXT_BACKING_FORMAT
    )
    area = kept + bytes(8)  # end marker
    assert header_length + len(area) <= name_at
    data[header_length:name_at] = area + bytes(name_at - header_length - len(area))
    image.write_bytes(bytes(data))


# ---------------------------------------------------------------- config and check-config


def toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, Path):
        return json.dumps(str(value))
    return json.dumps(value)


def write_config(path: Path, exports: list[Keys], **server: object) -> Path:
    lines = ["[server]", *(f"{key} = {toml(value)}" for key, value in server.items())]
    for export in exports:
        lines += ["", "[[exports]]", *(f"{key} = {toml(value)}" for key, value in export.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def qcow2_export(path: str | Path, **keys: object) -> Keys:
    """An [[exports]] table named EXPORT; `keys` add to or override its defaults."""
    return {"name": EXPORT, "path": path, "format": "qcow2", "read_only": False, **keys}


def config_for(d: Path, top: str = "top.qcow2", **keys: object) -> Path:
    """A config next to the images with one qcow2 export of `top` (relative to `d`)."""
    return write_config(d / "nbdguard.toml", [qcow2_export(top, **keys)])


def nbdguard(*args: str, cwd: Path = ROOT, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    # the timeout also guards against an open() blocking on a FIFO
    return subprocess.run(
        [sys.executable, "-m", "nbdguard", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return nbdguard("check-config", str(config))


def assert_refused(
    result: subprocess.CompletedProcess[str],
    reason: str,
    paths: tuple[str, ...],
    layer: int | None,
    export: str = EXPORT,
) -> None:
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == 1, shown
    assert f"reason={reason}" in result.stderr, shown
    assert export in result.stderr, shown
    assert any(path in result.stderr for path in paths), shown
    if layer is not None:
        assert f"layer {layer}" in result.stderr, shown
    assert "Traceback" not in result.stderr, shown
    assert "OK" not in result.stdout, shown


def assert_accepted(result: subprocess.CompletedProcess[str]) -> None:
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == 0, shown
    assert "OK" in result.stdout, shown


# ---------------------------------------------------------------- refusal cases
# Each maker builds the images in `d` (with `d/../elsewhere` as the place outside), checks
# that they say what the case claims, and returns the export's extra config keys.


def elsewhere_base(d: Path) -> Path:
    (d.parent / "elsewhere").mkdir(exist_ok=True)
    return make_raw(d.parent / "elsewhere", "base.raw")


def case_format_missing(d: Path) -> Keys:
    make_raw(d, "base.raw")
    top = make_qcow2(d, "top.qcow2", "base.raw", "raw")
    drop_backing_format(top)
    info = qemu_info(top)
    assert info["backing-filename"] == "base.raw"
    assert "backing-filename-format" not in info
    sh("qemu-img", "check", "-q", "-U", "-f", "qcow2", str(top), cwd=d)  # still a valid image
    return {}


def case_outside_absolute(d: Path) -> Keys:
    base = elsewhere_base(d)
    make_qcow2(d, "top.qcow2", str(base), "raw")
    assert backing_name(d / "top.qcow2") == str(base) and os.path.isabs(str(base))
    return {}


def case_outside_dotdot(d: Path) -> Keys:
    elsewhere_base(d)
    make_qcow2(d, "top.qcow2", "../elsewhere/base.raw", "raw")
    assert backing_name(d / "top.qcow2") == "../elsewhere/base.raw"
    return {}


def case_outside_symlink(d: Path) -> Keys:
    base = elsewhere_base(d)
    (d / "base.raw").symlink_to("../elsewhere/base.raw")  # inside by name, outside by target
    assert Path(os.path.realpath(d / "base.raw")) == base.resolve()
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {}


def case_outside_symlinked_dir(d: Path) -> Keys:
    base = elsewhere_base(d)
    (d / "sub").symlink_to("../elsewhere", target_is_directory=True)
    assert Path(os.path.realpath(d / "sub" / "base.raw")) == base.resolve()
    make_qcow2(d, "top.qcow2", "sub/base.raw", "raw")
    return {}


def protocol_case(name: str) -> Callable[[Path], Keys]:
    def make(d: Path) -> Keys:
        make_raw(d, "base.raw")  # a resolver that strips "file:" would find this one
        make_qcow2(d, "top.qcow2", name, "raw")
        assert backing_name(d / "top.qcow2") == name
        return {}

    return make


JSON_NAME = 'json:{"driver": "raw", "file": {"driver": "file", "filename": "/etc/passwd"}}'


def case_cycle(d: Path) -> Keys:
    make_qcow2(d, "a.qcow2", "b.qcow2", "qcow2")
    make_qcow2(d, "b.qcow2", "a.qcow2", "qcow2")
    assert backing_name(d / "a.qcow2") == "b.qcow2" and backing_name(d / "b.qcow2") == "a.qcow2"
    return {"path": "a.qcow2"}


def case_cycle_read_only(d: Path) -> Keys:
    return {**case_cycle(d), "read_only": True}


def case_self_cycle(d: Path) -> Keys:
    make_qcow2(d, "top.qcow2", "./top.qcow2", "qcow2")  # qemu-img refuses "top.qcow2" itself
    return {}


def case_hardlink_cycle(d: Path) -> Keys:
    # another name, the same inode: a cycle is decided by (st_dev, st_ino), not by name
    make_qcow2(d, "top.qcow2", "alias.qcow2", "qcow2")
    os.link(d / "top.qcow2", d / "alias.qcow2")
    assert os.path.samefile(d / "top.qcow2", d / "alias.qcow2")
    return {}


def make_chain(d: Path, depth: int) -> list[str]:
    """top.qcow2 -> l1.qcow2 -> ... -> l{depth-1}.raw: `depth` images in all."""
    names = ["top.qcow2", *(f"l{i}.qcow2" for i in range(1, depth - 1)), f"l{depth - 1}.raw"]
    make_raw(d, names[-1])
    below_format = "raw"
    for upper, lower in zip(reversed(names[:-1]), reversed(names[1:]), strict=True):
        make_qcow2(d, upper, lower, below_format)
        below_format = "qcow2"
    info = sh("qemu-img", "info", "-U", "--backing-chain", "--output=json", names[0], cwd=d)
    assert [layer["filename"] for layer in json.loads(info.stdout)] == names
    return names


def case_too_deep(d: Path) -> Keys:
    make_chain(d, 4)
    return {"max_chain_depth": 3}


def case_depth_one(d: Path) -> Keys:
    make_raw(d, "base.raw")
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {"max_chain_depth": 1}


def case_directory(d: Path) -> Keys:
    (d / "base.raw").mkdir()
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {}


def case_fifo(d: Path) -> Keys:
    os.mkfifo(d / "base.raw")  # opening it for reading would block until a writer comes
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {}


def case_char_device(d: Path) -> Keys:
    (d / "base.raw").symlink_to("/dev/zero")
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {"allow_dirs": ["/dev"]}  # allowed place, wrong kind of file


def case_pin_format(d: Path) -> Keys:
    make_raw(d, "base.raw")
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {"backing": [{"path": "base.raw", "format": "qcow2"}]}


def case_pin_path(d: Path) -> Keys:
    make_raw(d, "base.raw")
    make_raw(d, "other.raw")
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {"backing": [{"path": "other.raw", "format": "raw"}]}


def case_pin_empty(d: Path) -> Keys:
    make_raw(d, "base.raw")
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {"backing": []}


def case_pin_short(d: Path) -> Keys:
    make_chain(d, 3)  # top.qcow2 -> l1.qcow2 -> l2.raw, but only l1 pinned
    return {"backing": [{"path": "l1.qcow2", "format": "qcow2"}]}


def case_pin_long(d: Path) -> Keys:
    make_raw(d, "base.raw")
    make_raw(d, "extra.raw")
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {
        "backing": [{"path": "base.raw", "format": "raw"}, {"path": "extra.raw", "format": "raw"}]
    }


def create_encrypted(d: Path, name: str, encrypt_format: str) -> Path:
    options = f"encrypt.format={encrypt_format},encrypt.key-secret=sec0"
    if encrypt_format == "luks":
        options += ",encrypt.iter-time=10"
    command = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc"]
    for _ in range(5):  # LUKS key setup benchmarks the CPU and can fail on a busy machine
        made = subprocess.run([*command, "-o", options, name, "1M"], cwd=d, capture_output=True)
        if made.returncode == 0:
            expected = {"aes": 1, "luks": 2}[encrypt_format]
            assert header_u32(d / name, CRYPT_METHOD) == expected
            return d / name
    pytest.skip(f"qemu-img cannot create a {encrypt_format} qcow2 image here")


def case_encrypted_luks(d: Path) -> Keys:
    create_encrypted(d, "top.qcow2", "luks")
    return {}


def case_encrypted_aes(d: Path) -> Keys:
    create_encrypted(d, "top.qcow2", "aes")
    return {}


def case_encrypted_backing(d: Path) -> Keys:
    create_encrypted(d, "base.qcow2", "aes")
    make_qcow2(d, "top.qcow2", "base.qcow2", "qcow2")
    return {}


def case_unknown_bit(d: Path) -> Keys:
    top = make_qcow2(d, "top.qcow2")
    assert header_u32(top, 4) == 3 and header_u64(top, INCOMPATIBLE) == 0
    set_u64(top, INCOMPATIBLE, UNKNOWN_INCOMPATIBLE_BIT)
    refused = subprocess.run(["qemu-img", "info", "-U", str(top)], capture_output=True, text=True)
    assert refused.returncode != 0 and "Unsupported" in refused.stderr  # QEMU refuses it too
    return {}


def case_unknown_bit_backing(d: Path) -> Keys:
    base = make_qcow2(d, "base.qcow2")
    set_u64(base, INCOMPATIBLE, UNKNOWN_INCOMPATIBLE_BIT)
    make_qcow2(d, "top.qcow2", "base.qcow2", "qcow2")
    return {}


def case_corrupt(d: Path) -> Keys:
    top = make_qcow2(d, "top.qcow2")
    set_u64(top, INCOMPATIBLE, CORRUPT_BIT)
    assert qemu_info(top)["format-specific"]["data"]["corrupt"] is True  # type: ignore[index]
    return {}


def case_vmdk(d: Path) -> Keys:
    sh("qemu-img", "create", "-q", "-f", "vmdk", "base.vmdk", "1M", cwd=d)
    top = make_qcow2(d, "top.qcow2", "base.vmdk", "vmdk")
    assert qemu_info(top)["backing-filename-format"] == "vmdk"
    return {}


def case_missing(d: Path) -> Keys:
    make_qcow2(d, "top.qcow2", "gone.raw", "raw")
    assert not (d / "gone.raw").exists()
    return {}


def case_missing_top(d: Path) -> Keys:
    return {"path": "gone.qcow2"}


def case_unreadable(d: Path) -> Keys:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    make_raw(d, "base.raw").chmod(0)
    make_qcow2(d, "top.qcow2", "base.raw", "raw")
    return {}


def case_truncated(d: Path) -> Keys:
    (d / "top.qcow2").write_bytes(b"QFI\xfb" + bytes(46))
    assert (d / "top.qcow2").stat().st_size == 50
    return {}


def case_truncated_backing(d: Path) -> Keys:
    (d / "base.qcow2").write_bytes(b"QFI\xfb" + struct.pack(">I", 3) + bytes(42))
    make_qcow2(d, "top.qcow2", "base.qcow2", "qcow2")
    return {}


def case_cluster_bits(d: Path) -> Keys:
    top = make_qcow2(d, "top.qcow2")
    assert header_u32(top, CLUSTER_BITS) == 16
    set_u32(top, CLUSTER_BITS, 40)
    return {}


def case_long_backing_name(d: Path) -> Keys:
    top = make_qcow2(d, "top.qcow2", "base.raw", "raw")
    set_u32(top, BACKING_FILE_SIZE, 1 << 20)  # QEMU caps names at 1023 bytes
    return {}


@dataclass(frozen=True)
class Refusal:
    make: Callable[[Path], Keys]
    reason: str
    paths: tuple[str, ...]  # the message must name one of these
    layer: int
    top: str = "top.qcow2"


REFUSALS: dict[str, Refusal] = {
    "format-missing": Refusal(case_format_missing, "format_missing", ("base.raw",), 1),
    "outside-absolute": Refusal(case_outside_absolute, "outside_allow_dirs", ("elsewhere",), 1),
    "outside-dotdot": Refusal(case_outside_dotdot, "outside_allow_dirs", ("elsewhere",), 1),
    "outside-symlink": Refusal(case_outside_symlink, "outside_allow_dirs", ("base.raw",), 1),
    "outside-symlinked-dir": Refusal(
        case_outside_symlinked_dir, "outside_allow_dirs", ("base.raw",), 1
    ),
    "json": Refusal(protocol_case(JSON_NAME), "protocol_name", ("json:",), 1),
    "nbd": Refusal(protocol_case("nbd:127.0.0.1:10809"), "protocol_name", ("nbd:",), 1),
    "nbd-unix": Refusal(
        protocol_case("nbd+unix:///x?socket=/tmp/s"), "protocol_name", ("nbd+unix:",), 1
    ),
    "file": Refusal(protocol_case("file:base.raw"), "protocol_name", ("file:",), 1),
    "http": Refusal(protocol_case("http://example.com/base.raw"), "protocol_name", ("http:",), 1),
    "cycle": Refusal(case_cycle, "cycle", ("a.qcow2",), 2),
    "cycle-read-only": Refusal(case_cycle_read_only, "cycle", ("a.qcow2",), 2),
    "self-cycle": Refusal(case_self_cycle, "cycle", ("top.qcow2",), 1),
    "hardlink-cycle": Refusal(case_hardlink_cycle, "cycle", ("alias.qcow2",), 1),
    "too-deep": Refusal(case_too_deep, "too_deep", ("l3.raw",), 3),
    "depth-one": Refusal(case_depth_one, "too_deep", ("base.raw",), 1),
    "directory": Refusal(case_directory, "not_regular_file", ("base.raw",), 1),
    "fifo": Refusal(case_fifo, "not_regular_file", ("base.raw",), 1),
    "char-device": Refusal(case_char_device, "not_regular_file", ("base.raw", "/dev/zero"), 1),
    "pin-format": Refusal(case_pin_format, "pin_mismatch", ("base.raw",), 1),
    "pin-path": Refusal(case_pin_path, "pin_mismatch", ("base.raw", "other.raw"), 1),
    "pin-empty": Refusal(case_pin_empty, "pin_mismatch", ("base.raw",), 1),
    "pin-short": Refusal(case_pin_short, "pin_mismatch", ("l2.raw",), 2),
    "pin-long": Refusal(case_pin_long, "pin_mismatch", ("base.raw", "extra.raw"), 1),
    "encrypted-luks": Refusal(case_encrypted_luks, "encrypted", ("top.qcow2",), 0),
    "encrypted-aes": Refusal(case_encrypted_aes, "encrypted", ("top.qcow2",), 0),
    "encrypted-backing": Refusal(case_encrypted_backing, "encrypted", ("base.qcow2",), 1),
    "unknown-bit": Refusal(case_unknown_bit, "unsupported_feature", ("top.qcow2",), 0),
    "unknown-bit-backing": Refusal(
        case_unknown_bit_backing, "unsupported_feature", ("base.qcow2",), 1
    ),
    "corrupt-writable": Refusal(case_corrupt, "corrupt", ("top.qcow2",), 0),
    "vmdk-backing": Refusal(case_vmdk, "unsupported_format", ("base.vmdk",), 1),
    "missing": Refusal(case_missing, "open_failed", ("gone.raw",), 1),
    "missing-top": Refusal(case_missing_top, "open_failed", ("gone.qcow2",), 0),
    "unreadable": Refusal(case_unreadable, "open_failed", ("base.raw",), 1),
    "truncated": Refusal(case_truncated, "bad_header", ("top.qcow2",), 0),
    "truncated-backing": Refusal(case_truncated_backing, "bad_header", ("base.qcow2",), 1),
    "cluster-bits": Refusal(case_cluster_bits, "bad_header", ("top.qcow2",), 0),
    "long-backing-name": Refusal(case_long_backing_name, "bad_header", ("top.qcow2",), 0),
}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    require("qemu-img")
    directory = tmp_path / "images"
    directory.mkdir()
    return directory


@pytest.mark.parametrize("case", REFUSALS)
def test_check_config_refuses_with_the_reason(images: Path, case: str) -> None:
    refusal = REFUSALS[case]
    export = {**qcow2_export(refusal.top), **refusal.make(images)}
    started = time.monotonic()
    result = check_config(write_config(images / "nbdguard.toml", [export]))
    assert_refused(result, refusal.reason, refusal.paths, refusal.layer)
    assert time.monotonic() - started < 20


# ---------------------------------------------------------------- accepted chains


def accepted_allowed_absolute(d: Path) -> Keys:
    case_outside_absolute(d)
    return {"allow_dirs": [str((d.parent / "elsewhere").resolve())]}


def accepted_allowed_dotdot(d: Path) -> Keys:
    case_outside_dotdot(d)
    return {"allow_dirs": [str(d.parent / "elsewhere")]}


def accepted_allowed_symlink(d: Path) -> Keys:
    case_outside_symlink(d)
    return {"allow_dirs": [str(d.parent / "elsewhere")]}


def accepted_allowed_symlinked_dir(d: Path) -> Keys:
    case_outside_symlinked_dir(d)
    return {"allow_dirs": [str(d.parent / "elsewhere")]}


def accepted_depth(d: Path) -> Keys:
    make_chain(d, 4)
    return {"max_chain_depth": 4}


def accepted_default_depth(d: Path) -> Keys:
    make_chain(d, 16)  # the default max_chain_depth
    return {}


def accepted_depth_one(d: Path) -> Keys:
    make_qcow2(d, "top.qcow2")
    return {"max_chain_depth": 1}


def accepted_pin(d: Path) -> Keys:
    names = make_chain(d, 3)
    return {"backing": [{"path": names[1], "format": "qcow2"}, {"path": names[2], "format": "raw"}]}


def accepted_pin_supplies_format(d: Path) -> Keys:
    case_format_missing(d)
    return {"backing": [{"path": "base.raw", "format": "raw"}]}


def accepted_pin_absolute_outside(d: Path) -> Keys:
    base = elsewhere_base(d)
    make_qcow2(d, "top.qcow2", "../elsewhere/base.raw", "raw")
    return {"allow_dirs": [str(base.parent)], "backing": [{"path": str(base), "format": "raw"}]}


def accepted_corrupt_read_only(d: Path) -> Keys:
    case_corrupt(d)
    return {"read_only": True}


def accepted_no_backing_empty_pin(d: Path) -> Keys:
    make_qcow2(d, "top.qcow2")
    return {"backing": []}


ACCEPTED: dict[str, Callable[[Path], Keys]] = {
    "allowed-absolute": accepted_allowed_absolute,
    "allowed-dotdot": accepted_allowed_dotdot,
    "allowed-symlink": accepted_allowed_symlink,
    "allowed-symlinked-dir": accepted_allowed_symlinked_dir,
    "depth-4-of-4": accepted_depth,
    "depth-16-default": accepted_default_depth,
    "depth-1-alone": accepted_depth_one,
    "pin-whole-chain": accepted_pin,
    "pin-supplies-format": accepted_pin_supplies_format,
    "pin-absolute-outside": accepted_pin_absolute_outside,
    "corrupt-read-only": accepted_corrupt_read_only,
    "no-backing-empty-pin": accepted_no_backing_empty_pin,
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_check_config_accepts(images: Path, case: str) -> None:
    export = {**qcow2_export("top.qcow2"), **ACCEPTED[case](images)}
    assert_accepted(check_config(write_config(images / "nbdguard.toml", [export])))


def test_default_depth_is_16(images: Path) -> None:
    make_chain(images, 17)
    result = check_config(config_for(images))
    assert_refused(result, "too_deep", ("l16.raw",), 16)


def test_relative_allow_dirs_are_relative_to_the_config_file(tmp_path: Path) -> None:
    require("qemu-img")
    images = tmp_path / "images"
    images.mkdir()
    case_outside_dotdot(images)
    conf = tmp_path / "conf" / "nested"
    conf.mkdir(parents=True)
    # "../../elsewhere" means tmp_path/elsewhere only from the config's directory: from the
    # image's directory it is tmp_path's parent's, from the working directory (/) it is /.
    export = qcow2_export("../../images/top.qcow2", allow_dirs=["../../elsewhere"])
    accepted = nbdguard("check-config", str(write_config(conf / "c.toml", [export])), cwd=Path("/"))
    assert_accepted(accepted)
    export["allow_dirs"] = ["../../images"]  # the top's own directory: the base is still out
    refused = nbdguard("check-config", str(write_config(conf / "c.toml", [export])), cwd=Path("/"))
    assert_refused(refused, "outside_allow_dirs", ("elsewhere",), 1)


def test_only_the_refused_export_fails_check_config(images: Path) -> None:
    protocol_case(JSON_NAME)(images)
    make_raw(images, "good.raw")
    make_qcow2(images, "plain.qcow2")
    exports: list[Keys] = [
        {"name": "good-raw", "path": "good.raw", "format": "raw"},
        qcow2_export("top.qcow2"),
        {"name": "good-qcow2", "path": "plain.qcow2", "format": "qcow2"},
    ]
    result = check_config(write_config(images / "nbdguard.toml", exports))
    assert_refused(result, "protocol_name", ("json:",), 1)
    assert "good-raw" not in result.stderr and "good-qcow2" not in result.stderr


# ---------------------------------------------------------------- config validation: exit 2


INVALID: dict[str, tuple[Keys, str]] = {
    # name: (export keys, a word the message must contain)
    "depth-0": ({"max_chain_depth": 0}, "max_chain_depth"),
    "depth-negative": ({"max_chain_depth": -3}, "max_chain_depth"),
    "depth-fraction": ({"max_chain_depth": 2.5}, "max_chain_depth"),
    "depth-string": ({"max_chain_depth": "4"}, "max_chain_depth"),
    "backing-no-format": ({"backing": [{"path": "base.raw"}]}, "format"),
    "backing-no-path": ({"backing": [{"format": "raw"}]}, "path"),
    "backing-vmdk": ({"backing": [{"path": "base.vmdk", "format": "vmdk"}]}, "vmdk"),
    "backing-not-a-list": ({"backing": "base.raw"}, "backing"),
    "allow-dirs-not-a-list": ({"allow_dirs": 5}, "allow_dirs"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_chain_keys_exit_2(tmp_path: Path, case: str) -> None:
    keys, word = INVALID[case]
    config = write_config(tmp_path / "c.toml", [qcow2_export("top.qcow2", **keys)])
    for args in (["check-config", str(config)], ["serve", "--config", str(config)]):
        result = nbdguard(*args)
        assert result.returncode == 2, f"{args}: {result.returncode}\n{result.stderr}"
        assert word in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- mutated headers, in-process

# name: (offset, size in bytes) of the header fields the fuzzer rewrites
FIELDS: dict[str, tuple[int, int]] = {
    "version": (4, 4),
    "backing_file_offset": (8, 8),
    "backing_file_size": (16, 4),
    "cluster_bits": (20, 4),
    "size": (24, 8),
    "crypt_method": (32, 4),
    "l1_size": (36, 4),
    "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4),
    "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8),
    "compatible_features": (80, 8),
    "autoclear_features": (88, 8),
    "refcount_order": (96, 4),
    "header_length": (100, 4),
}
MAX_RSS_KIB = 1 << 20  # ru_maxrss is in KiB on Linux: 1 GiB
EXAMPLE_SECONDS = 5.0


def field_values(size: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    interesting = [0, 1, 2, 3, 4, 7, 8, 9, 12, 16, 20, 21, 22, 31, 32, 63, 64, 72, 104, 112]
    interesting += [511, 512, 4096, 65535, 65536, 1 << 20, 1 << 24, 0x7FFFFFFF, 0x80000000]
    interesting += [1 << 32, 1 << 56, 1 << 62, top - 1, top]
    return st.one_of(
        st.sampled_from([value for value in interesting if value <= top]),
        st.integers(0, 256).map(lambda clusters: clusters * 65536),  # plausible offsets
        st.integers(0, top),
    )


@st.composite
def mutation(draw: st.DrawFn) -> tuple[str, int, int]:
    """("field", offset, value), ("ext-type"/"ext-length", extension index, value),
    ("byte", offset, value) or ("truncate", length, 0)."""
    kind = draw(st.sampled_from(["field", "field", "field", "ext", "byte", "truncate"]))
    if kind == "field":
        name = draw(st.sampled_from(sorted(FIELDS)))
        offset, size = FIELDS[name]
        return "field", offset, draw(field_values(size))
    if kind == "ext":
        which = draw(st.sampled_from(["ext-type", "ext-length"]))
        value = draw(field_values(4)) if which == "ext-length" else draw(st.integers(0, 2**32 - 1))
        return which, draw(st.integers(0, 3)), value
    if kind == "byte":
        return "byte", draw(st.integers(0, 4095)), draw(st.integers(0, 255))
    return "truncate", draw(st.one_of(st.integers(0, 4096), st.integers(0, 1 << 20))), 0


def mutate(seed: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(seed)
    for kind, where, value in mutations:
        if kind == "field":
            size = next(size for offset, size in FIELDS.values() if offset == where)
            data[where : where + size] = value.to_bytes(size, "big")
        elif kind in ("ext-type", "ext-length"):
            found = extensions(bytes(data)) if len(data) >= 104 else []
            if where < len(found):
                at = found[where][0] + (0 if kind == "ext-type" else 4)
                data[at : at + 4] = value.to_bytes(4, "big")
        elif kind == "byte":
            if where < len(data):
                data[where] = value
        else:
            del data[where:]
    return bytes(data)


class FuzzBed:
    def __init__(self, directory: Path, seeds: dict[str, bytes]) -> None:
        self.directory = directory
        self.seeds = seeds
        self.examples = 0

    def __repr__(self) -> str:  # hypothesis prints it with a failing example: not the seeds
        return f"FuzzBed({self.directory})"

    def image(self, data: bytes, *, read_only: bool) -> Path:
        """A fresh image file and config for one example, so that examples stay independent
        (a file left open and locked by one would otherwise change the next one's answer)."""
        self.examples += 1
        image = self.directory / f"top-{self.examples}.qcow2"
        image.write_bytes(data)
        export = qcow2_export(image.name, read_only=read_only)
        return write_config(self.directory / f"c-{self.examples}.toml", [export])


@pytest.fixture(scope="module")
def fuzz_bed(tmp_path_factory: pytest.TempPathFactory) -> FuzzBed:
    """Real qemu-img images to start from: a backed v3 image with data (one cluster
    compressed), one with an internal snapshot, one with extended L2 entries and zstd, and
    a version 2 image; base.raw sits next to them so that unmutated seeds are accepted."""
    require("qemu-img", "qemu-io")
    d = tmp_path_factory.mktemp("fuzz-headers")
    make_raw(d, "base.raw")
    writes = ["-c", "write -P 0xab 0 128k", "-c", "write -c -P 0xcd 256k 64k"]
    made = {
        "backed": ["-u", "-b", "base.raw", "-F", "raw"],
        "snapshot": [],
        "extended-l2": ["-o", "extended_l2=on,cluster_size=16k,compression_type=zstd"],
        "v2": ["-o", "compat=0.10,cluster_size=4k"],
    }
    seeds = {}
    for name, options in made.items():
        image = d / f"{name}.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", *options, image.name, "1M", cwd=d)
        sh("qemu-io", "-f", "qcow2", *writes, image.name, cwd=d)
        if name == "snapshot":
            sh("qemu-img", "snapshot", "-c", "snap1", image.name, cwd=d)
            sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", image.name, cwd=d)
        sh("qemu-img", "check", "-q", "-f", "qcow2", image.name, cwd=d)
        seeds[name] = image.read_bytes()
    assert extensions(seeds["backed"]) and backing_name(d / "backed.qcow2") == "base.raw"
    assert header_u32(d / "v2.qcow2", 4) == 2
    assert header_u32(d / "snapshot.qcow2", 60) == 1  # nb_snapshots
    bed = FuzzBed(d, seeds)
    for seed in seeds.values():  # every seed as it is: accepted
        for read_only in (False, True):
            assert_accepted(check_config(bed.image(seed, read_only=read_only)))
    return bed


class ExampleTimeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise ExampleTimeout(f"check-config took more than {EXAMPLE_SECONDS} s")


def run_check_config_in_process(config: Path) -> tuple[int, str, str]:
    """`nbdguard check-config` through its main(), under a SIGALRM deadline (any timer of
    pytest-timeout is put back afterwards); returns (status, stdout, stderr)."""
    from nbdguard.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    pending, interval = signal.setitimer(signal.ITIMER_REAL, EXAMPLE_SECONDS)
    started = time.monotonic()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = main(["check-config", str(config)])
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 2
    except ExampleTimeout:
        raise AssertionError(f"check-config hung on this header\n{err.getvalue()}") from None
    except Exception:
        raise AssertionError(f"check-config raised:\n{traceback.format_exc()}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:
            left = max(pending - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, interval)
    return status, out.getvalue(), err.getvalue()


HEADER_REFUSALS = ["truncated", "unknown-bit", "corrupt-writable", "encrypted-aes", "cluster-bits"]


@pytest.mark.parametrize("case", HEADER_REFUSALS)
def test_a_header_refusal_leaves_nothing_open(images: Path, case: str) -> None:
    """Refused at its header, the image must be closed and unlocked again: the same process
    (a serving nbdguard, a reload) must get the same answer next time, not `locked`."""
    refusal = REFUSALS[case]
    export = {**qcow2_export(refusal.top), **refusal.make(images)}
    config = write_config(images / "c.toml", [export])
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        status, _, err = run_check_config_in_process(config)
        assert status == 1 and f"reason={refusal.reason}" in err, err
    assert len(os.listdir("/proc/self/fd")) == fds, "the refused image is still open"


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.sampled_from(["backed", "snapshot", "extended-l2", "v2"]),
    mutations=st.lists(mutation(), min_size=1, max_size=4),
    read_only=st.booleans(),
)
def test_mutated_headers_are_accepted_or_refused_with_a_reason(
    fuzz_bed: FuzzBed, seed: str, mutations: list[tuple[str, int, int]], read_only: bool
) -> None:
    config = fuzz_bed.image(mutate(fuzz_bed.seeds[seed], mutations), read_only=read_only)
    fds = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    status, out, err = run_check_config_in_process(config)
    elapsed = time.monotonic() - started
    assert status in (0, 1), f"exit {status}\n{out}\n{err}"
    if status == 1:
        assert "reason=" in err and EXPORT in err, err
        event(f"refused: {err.rsplit('reason=', 1)[1].split(']')[0].strip()}")
    else:
        assert "OK" in out, out
        event("accepted")
    assert len(os.listdir("/proc/self/fd")) == fds, "check-config left files open"
    assert "Traceback" not in err, err
    assert elapsed < EXAMPLE_SECONDS, elapsed
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < MAX_RSS_KIB


# ---------------------------------------------------------------- serve


def events(log: str) -> list[dict[str, object]]:
    """The JSON log lines (other lines, if any, are skipped)."""
    parsed = []
    for line in log.splitlines():
        if line.startswith("{"):
            parsed.append(json.loads(line))
    return parsed


def pattern_base(d: Path, name: str = "base.raw", byte: int = 0x5A) -> Path:
    base = make_raw(d, name)
    with open(base, "r+b") as handle:
        handle.write(bytes([byte]) * 65536)
    return base


def test_serve_reports_a_refused_export_and_serves_the_others(tmp_path: Path) -> None:
    require("qemu-img")
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    refused_dir = tmp_path / "images"
    refused_dir.mkdir()
    case_outside_dotdot(refused_dir)
    ok_dir = tmp_path / "ok"
    ok_dir.mkdir()
    pattern_base(ok_dir)
    drop_backing_format(make_qcow2(ok_dir, "top.qcow2", "base.raw", "raw"))
    exports = [
        ExportSpec("good", size=MiB, fill=b"\xc3" * 4096),
        ExportSpec(EXPORT, image=refused_dir / "top.qcow2", format="qcow2"),
        ExportSpec(
            "chain-ok",
            image=ok_dir / "top.qcow2",
            format="qcow2",
            extra={"backing": [{"path": str(ok_dir / "base.raw"), "format": "raw"}]},
        ),
    ]
    server = start_server(tmp_path / "srv", exports, metrics=True)
    try:
        reads = {"good": (b"\xc3" * 4096, b""), "chain-ok": (b"\x5a" * 65536, bytes(4096))}
        for name, (start, after) in reads.items():
            handle = nbd.NBD()
            handle.connect_uri(server.uri(name))
            assert handle.pread(len(start), 0) == start, name
            if after:
                assert handle.pread(4096, 65536) == after, name
            handle.shutdown()
        handle = nbd.NBD()
        with pytest.raises(nbd.Error):  # the refused export is not offered at all
            handle.connect_uri(server.uri(EXPORT))
        text = server.scrape()[1]
        labels = {"export": EXPORT, "reason": "outside_allow_dirs"}
        assert sample(text, "nbdguard_chain_refused_total", **labels) == 1, text
        assert sample(text, "nbdguard_export_up", export=EXPORT) == 0
        assert sample(text, "nbdguard_export_up", export="good") == 1
        assert sample(text, "nbdguard_export_up", export="chain-ok") == 1
        assert sample(text, "nbdguard_chain_refused_total", export="chain-ok") in (None, 0)
        status, body = server.scrape("/healthz")
        assert status == 503 and EXPORT in body, body
    finally:
        assert server.stop() == 0, server.log()
    refused = [event for event in events(server.log()) if event.get("event") == "chain.refused"]
    assert len(refused) == 1, server.log()
    [event] = refused
    assert event["export"] == EXPORT and event["reason"] == "outside_allow_dirs"
    assert event["layer"] == 1 and event["level"] == "error"
    assert "elsewhere" in str(event["path"]) or "base.raw" in str(event["path"])
    message = str(event["message"])
    assert "reason=outside_allow_dirs" in message and EXPORT in message and "layer 1" in message


def test_serve_with_only_refused_exports_exits_1(tmp_path: Path) -> None:
    require("qemu-img")
    images = tmp_path / "images"
    images.mkdir()
    case_fifo(images)  # also: a FIFO must not make serve hang
    config = write_config(
        images / "c.toml",
        [qcow2_export("top.qcow2")],
        listen=[f"unix://{tmp_path}/s.sock"],
        log_format="json",
    )
    started = time.monotonic()
    result = nbdguard("serve", "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 15
    output = result.stdout + result.stderr
    assert "reason=not_regular_file" in output and EXPORT in output
    refused = [e for e in events(output) if e.get("event") == "chain.refused"]
    assert [(e["export"], e["reason"], e["layer"]) for e in refused] == [
        (EXPORT, "not_regular_file", 1)
    ]
    assert not (tmp_path / "s.sock").exists()


# ---------------------------------------------------------------- locks


def qemu_io_write(image: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "write -P 0xee 0 512", str(image)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_locks_keep_writers_off_the_chain(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    images = tmp_path / "images"
    images.mkdir()
    base = pattern_base(images)
    top = make_qcow2(images, "top.qcow2", "base.raw", "raw")
    before = {path: path.read_bytes() for path in (base, top)}
    server = start_server(tmp_path / "srv", [ExportSpec(EXPORT, image=top, format="qcow2")])
    try:
        for image, fmt in ((top, "qcow2"), (base, "raw")):
            writer = qemu_io_write(image, fmt)
            output = writer.stdout + writer.stderr
            # qemu-io: 'Failed to get "write" lock' / "Is another process using the image"
            assert writer.returncode != 0 and "lock" in output, f"{image.name}: {output}"
            assert image.read_bytes() == before[image], image.name
        other = write_config(
            tmp_path / "other.toml",
            [qcow2_export(top)],
            listen=[f"unix://{tmp_path}/other.sock"],
            log_format="json",
        )
        second = nbdguard("serve", "--config", str(other))
        assert second.returncode == 1, second.stdout + second.stderr
        output = second.stdout + second.stderr
        assert "reason=locked" in output and EXPORT in output and "top.qcow2" in output
        checked = check_config(other)
        assert_refused(checked, "locked", ("top.qcow2",), 0)
        handle = nbd.NBD()  # the first server is unaffected
        handle.connect_uri(server.uri(EXPORT))
        assert handle.pread(512, 0) == b"\x5a" * 512
        handle.shutdown()
    finally:
        assert server.stop() == 0, server.log()
    for image, fmt in ((top, "qcow2"), (base, "raw")):  # control: the locks were the reason
        writer = qemu_io_write(image, fmt)
        assert writer.returncode == 0, writer.stdout + writer.stderr
