"""Chain policy: every way an image could pick the files nbdguard opens is refused with the
right reason, by `check-config` and by `serve` (log event, metric, health, other exports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.conftest import ExportSpec, require, start_server

pytestmark = pytest.mark.interop


def sh(command: str, cwd: Path) -> None:
    subprocess.run(command, shell=True, check=True, cwd=cwd, capture_output=True)


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdguard", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,  # a FIFO must not block the open
    )


def config_for(directory: Path, top: str, *, read_only: bool = False, **keys: object) -> Path:
    lines = [
        "[[exports]]",
        'name = "vm"',
        f'path = "{top}"',
        'format = "qcow2"',
        f"read_only = {'true' if read_only else 'false'}",
    ]
    lines += [f"{key} = {toml(value)}" for key, value in keys.items()]
    path = directory / "nbdguard.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toml(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def set_header_u64(image: Path, offset: int, value: int) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(value.to_bytes(8, "big"))


def overlay(d: Path, backing: str, fmt: str = "raw", name: str = "top.qcow2") -> None:
    sh(f"qemu-img create -q -f qcow2 -u -b '{backing}' -F {fmt} {name} 1M", d)


def case_format_missing(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f raw base.raw 1M", d)
    overlay(d, "base.raw")
    # qemu-img 7.2 will not write a backing name without a format any more; older ones did.
    # Turn the backing-format extension into an unknown one, which readers skip.
    data = bytearray((d / "top.qcow2").read_bytes())
    at = data.index((0xE2792ACA).to_bytes(4, "big"))
    data[at : at + 4] = (0x0BAD0BAD).to_bytes(4, "big")
    (d / "top.qcow2").write_bytes(bytes(data))
    info = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(d / "top.qcow2")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "backing-filename-format" not in json.loads(info.stdout)
    return {}


def case_outside_absolute(d: Path) -> dict[str, object]:
    sh("mkdir -p ../elsewhere && qemu-img create -q -f raw ../elsewhere/base.raw 1M", d)
    overlay(d, str((d / "../elsewhere/base.raw").resolve()))
    return {}


def case_outside_dotdot(d: Path) -> dict[str, object]:
    sh("mkdir -p ../elsewhere && qemu-img create -q -f raw ../elsewhere/base.raw 1M", d)
    overlay(d, "../elsewhere/base.raw")
    return {}


def case_outside_symlink(d: Path) -> dict[str, object]:
    sh("mkdir -p ../elsewhere && qemu-img create -q -f raw ../elsewhere/base.raw 1M", d)
    os.symlink(d / "../elsewhere/base.raw", d / "base.raw")  # inside by name, not by target
    overlay(d, "base.raw")
    return {}


def case_json(d: Path) -> dict[str, object]:
    overlay(d, 'json:{"file": {"driver": "file", "filename": "/etc/shadow"}}')
    return {}


def case_nbd(d: Path) -> dict[str, object]:
    overlay(d, "nbd:127.0.0.1:10809")
    return {}


def case_cycle(d: Path) -> dict[str, object]:
    overlay(d, "b.qcow2", "qcow2", "a.qcow2")
    overlay(d, "a.qcow2", "qcow2", "b.qcow2")
    overlay(d, "a.qcow2", "qcow2")
    return {}


def case_too_deep(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f raw l3.raw 1M", d)
    overlay(d, "l3.raw", "raw", "l2.qcow2")
    overlay(d, "l2.qcow2", "qcow2", "l1.qcow2")
    overlay(d, "l1.qcow2", "qcow2")
    return {"max_chain_depth": 3}


def case_directory(d: Path) -> dict[str, object]:
    (d / "base.raw").mkdir()
    overlay(d, "base.raw")
    return {}


def case_fifo(d: Path) -> dict[str, object]:
    os.mkfifo(d / "base.raw")
    overlay(d, "base.raw")
    return {}


def case_pin_format(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f raw base.raw 1M", d)
    overlay(d, "base.raw")
    return {"backing": [{"path": "base.raw", "format": "qcow2"}]}


def case_pin_path(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f raw base.raw 1M && qemu-img create -q -f raw other.raw 1M", d)
    overlay(d, "base.raw")
    return {"backing": [{"path": "other.raw", "format": "raw"}]}


def case_pin_short(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f raw base.raw 1M", d)
    overlay(d, "base.raw")
    return {"backing": []}


def case_encrypted(d: Path) -> dict[str, object]:
    command = (
        "qemu-img create -q -f qcow2 --object secret,id=sec0,data=abc "
        "-o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 top.qcow2 1M"
    )
    for _ in range(5):  # LUKS key setup times the CPU, which can fail on a busy machine
        if subprocess.run(command, shell=True, cwd=d, capture_output=True).returncode == 0:
            return {}
    pytest.skip("qemu-img could not create a LUKS image here")


def case_unknown_bit(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f qcow2 top.qcow2 1M", d)
    set_header_u64(d / "top.qcow2", 72, 1 << 10)
    return {}


def case_corrupt(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f qcow2 top.qcow2 1M", d)
    set_header_u64(d / "top.qcow2", 72, 1 << 1)
    return {}


def case_vmdk(d: Path) -> dict[str, object]:
    sh("qemu-img create -q -f vmdk base.vmdk 1M", d)
    overlay(d, "base.vmdk", "vmdk")
    return {}


def case_missing(d: Path) -> dict[str, object]:
    overlay(d, "gone.raw")
    return {}


def case_truncated(d: Path) -> dict[str, object]:
    (d / "top.qcow2").write_bytes(b"QFI\xfb" + bytes(46))
    return {}


CASES: dict[str, tuple[Callable[[Path], dict[str, object]], str, str]] = {
    # name: (make the images, reason label, a path the message must name)
    "format-missing": (case_format_missing, "format_missing", "base.raw"),
    "outside-absolute": (case_outside_absolute, "outside_allow_dirs", "elsewhere"),
    "outside-dotdot": (case_outside_dotdot, "outside_allow_dirs", "elsewhere"),
    "outside-symlink": (case_outside_symlink, "outside_allow_dirs", "base.raw"),
    "json": (case_json, "protocol_name", "json:"),
    "nbd": (case_nbd, "protocol_name", "nbd:"),
    "cycle": (case_cycle, "cycle", "a.qcow2"),
    "too-deep": (case_too_deep, "too_deep", "l3.raw"),
    "directory": (case_directory, "not_regular_file", "base.raw"),
    "fifo": (case_fifo, "not_regular_file", "base.raw"),
    "pin-format": (case_pin_format, "pin_mismatch", "base.raw"),
    "pin-path": (case_pin_path, "pin_mismatch", "base.raw"),
    "pin-short": (case_pin_short, "pin_mismatch", "base.raw"),
    "encrypted": (case_encrypted, "encrypted", "top.qcow2"),
    "unknown-bit": (case_unknown_bit, "unsupported_feature", "top.qcow2"),
    "corrupt-writable": (case_corrupt, "corrupt", "top.qcow2"),
    "vmdk-backing": (case_vmdk, "unsupported_format", "base.vmdk"),
    "missing": (case_missing, "open_failed", "gone.raw"),
    "truncated": (case_truncated, "bad_header", "top.qcow2"),
}


@pytest.mark.parametrize("case", CASES)
def test_check_config_refuses_with_the_reason(tmp_path: Path, case: str) -> None:
    require("qemu-img")
    make, reason, named = CASES[case]
    images = tmp_path / "images"
    images.mkdir()
    keys = make(images)
    result = check_config(config_for(images, "top.qcow2", **keys))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"[reason={reason}]" in result.stderr
    assert "export 'vm'" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr


def test_allowed_and_pinned_chains_are_accepted(tmp_path: Path) -> None:
    require("qemu-img")
    images = tmp_path / "images"
    images.mkdir()
    case_outside_dotdot(images)
    elsewhere = str((tmp_path / "elsewhere").resolve())
    assert check_config(config_for(images, "top.qcow2", allow_dirs=[elsewhere])).returncode == 0
    pinned = config_for(
        images,
        "top.qcow2",
        allow_dirs=[elsewhere],
        backing=[{"path": f"{elsewhere}/base.raw", "format": "raw"}],
    )
    assert check_config(pinned).returncode == 0
    case_too_deep(images)
    assert check_config(config_for(images, "top.qcow2", max_chain_depth=4)).returncode == 0
    case_corrupt(images)
    assert check_config(config_for(images, "top.qcow2", read_only=True)).returncode == 0


def test_serve_reports_a_refused_export_and_serves_the_rest(tmp_path: Path) -> None:
    require("qemu-img", "nbdinfo")
    images = tmp_path / "images"
    images.mkdir()
    case_json(images)
    exports = [
        ExportSpec("good", size=1 << 20),
        ExportSpec("vm", image=images / "top.qcow2", format="qcow2"),
    ]
    server = start_server(tmp_path / "srv", exports, metrics=True)
    try:
        good = subprocess.run(["nbdinfo", server.uri("good")], capture_output=True, text=True)
        assert good.returncode == 0, good.stderr
        assert server.sample("nbdguard_chain_refused_total", export="vm", reason="protocol_name")
        assert server.sample("nbdguard_export_up", export="vm") == 0
        assert server.sample("nbdguard_export_up", export="good") == 1
        status, body = server.scrape("/healthz")
        assert status == 503 and "vm" in body
    finally:
        assert server.stop() == 0
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    refused = [e for e in events if e["event"] == "chain.refused"]
    assert len(refused) == 1
    assert refused[0]["export"] == "vm" and refused[0]["reason"] == "protocol_name"
    assert refused[0]["layer"] == 1 and refused[0]["path"].startswith("json:")
    assert refused[0]["level"] == "error" and "[reason=protocol_name]" in refused[0]["message"]


def test_serve_with_nothing_to_serve_exits_1(tmp_path: Path) -> None:
    require("qemu-img")
    images = tmp_path / "images"
    images.mkdir()
    case_cycle(images)
    config = config_for(images, "top.qcow2")
    result = subprocess.run(
        [sys.executable, "-m", "nbdguard", "serve", "--config", str(config),
         "--listen", f"unix://{tmp_path}/s.sock"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "reason=cycle" in result.stderr and "no export could be opened" in result.stderr


def test_locks_keep_writers_off_top_and_base(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    images = tmp_path / "images"
    images.mkdir()
    sh("qemu-img create -q -f raw base.raw 1M", images)
    overlay(images, "base.raw")
    exports = [ExportSpec("vm", image=images / "top.qcow2", format="qcow2")]
    server = start_server(tmp_path / "srv", exports)
    try:
        for image, fmt in (("top.qcow2", "qcow2"), ("base.raw", "raw")):
            writer = subprocess.run(
                ["qemu-io", "-f", fmt, "-c", "write 0 512", str(images / image)],
                capture_output=True, text=True,
            )  # fmt: skip
            assert writer.returncode != 0 and "lock" in writer.stderr, image
        second = check_config(config_for(images, "top.qcow2"))
        assert second.returncode == 1 and "reason=locked" in second.stderr
    finally:
        assert server.stop() == 0
