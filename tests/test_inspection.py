"""`nbdguard inspect` and `nbdguard pin` on chains made by qemu-img."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def nbdguard(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdguard", *args], capture_output=True, text=True, cwd=cwd
    )


def chain(tmp_path: Path) -> Path:
    """top.qcow2 -> shared/web.qcow2 (qcow2) -> shared/os.raw (raw), shared/ outside."""
    shared = tmp_path / "shared"
    images = tmp_path / "images"
    shared.mkdir()
    images.mkdir()
    for command in (
        "qemu-img create -q -f raw shared/os.raw 4M",
        "qemu-img create -q -f qcow2 -o cluster_size=4k -b os.raw -F raw shared/web.qcow2 4M",
        "qemu-img create -q -f qcow2 -b ../shared/web.qcow2 -F qcow2 images/top.qcow2 8M",
    ):
        subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    return images / "top.qcow2"


def test_inspect_lists_every_layer_with_its_format_source(tmp_path: Path) -> None:
    top = chain(tmp_path)
    result = nbdguard(
        "inspect", str(top), "--format", "qcow2", "--allow-dir", str(tmp_path / "shared"), "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["refused"] is None
    layers = report["layers"]
    assert [layer["format"] for layer in layers] == ["qcow2", "qcow2", "raw"]
    assert [layer["format_source"] for layer in layers] == ["config", "header", "header"]
    assert layers[0]["backing_name"] == "../shared/web.qcow2"
    assert layers[1]["path"] == str(tmp_path / "shared" / "web.qcow2")
    assert (layers[0]["virtual_size"], layers[1]["cluster_size"]) == (8 << 20, 4096)


def test_inspect_shows_where_and_why_a_chain_is_refused(tmp_path: Path) -> None:
    top = chain(tmp_path)
    result = nbdguard("inspect", str(top), "--format", "qcow2", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert len(report["layers"]) == 1  # the top opened; its backing did not
    assert report["refused"]["reason"] == "outside_allow_dirs"
    assert report["refused"]["layer"] == 1
    text = nbdguard("inspect", str(top), "--format", "qcow2")
    assert "REFUSED" in text.stdout and "reason=outside_allow_dirs" in text.stdout


def test_inspect_does_not_take_locks(tmp_path: Path) -> None:
    top = chain(tmp_path)
    holder = subprocess.Popen(  # qemu-io holds the image open read-write, locked
        ["qemu-io", "-f", "qcow2", str(top)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = tmp_path / "c.toml"
    config.write_text(
        f'[[exports]]\nname = "t"\npath = "{top}"\nformat = "qcow2"\nallow_dirs = ["{tmp_path}"]\n'
    )
    try:
        deadline = time.monotonic() + 10
        while "reason=locked" not in nbdguard("check-config", str(config)).stderr:
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.1)
        result = nbdguard("inspect", str(top), "-f", "qcow2", "--allow-dir", str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_pin_prints_a_stanza_that_check_config_accepts(tmp_path: Path) -> None:
    top = chain(tmp_path)
    result = nbdguard(
        "pin", str(top), "-f", "qcow2", "--allow-dir", str(tmp_path / "shared"), "--name", "web1"
    )
    assert result.returncode == 0, result.stderr
    stanza = tomllib.loads(result.stdout)["exports"][0]
    assert stanza["name"] == "web1"
    assert stanza["allow_dirs"] == [str(tmp_path / "shared")]
    assert stanza["backing"] == [
        {"path": str(tmp_path / "shared" / "web.qcow2"), "format": "qcow2"},
        {"path": str(tmp_path / "shared" / "os.raw"), "format": "raw"},
    ]
    config = tmp_path / "nbdguard.toml"
    config.write_text(result.stdout)
    checked = nbdguard("check-config", str(config))
    assert checked.returncode == 0, checked.stderr


def test_a_pinned_config_refuses_a_chain_changed_afterwards(tmp_path: Path) -> None:
    top = chain(tmp_path)
    pinned = nbdguard("pin", str(top), "-f", "qcow2", "--allow-dir", str(tmp_path / "shared"))
    config = tmp_path / "nbdguard.toml"
    config.write_text(pinned.stdout)
    # The guest (or anyone with write access to the image) points it elsewhere.
    (tmp_path / "shared" / "evil.raw").write_bytes(bytes(4096))
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-b", "../shared/evil.raw", "-F", "raw", str(top)],
        check=True,
    )
    checked = nbdguard("check-config", str(config))
    assert checked.returncode == 1
    assert "reason=pin_mismatch" in checked.stderr and "evil.raw" in checked.stderr


def test_pin_refuses_what_serve_would_refuse(tmp_path: Path) -> None:
    top = chain(tmp_path)
    result = nbdguard("pin", str(top), "-f", "qcow2")
    assert result.returncode == 1
    assert "reason=outside_allow_dirs" in result.stderr
    assert result.stdout == ""


def test_inspect_and_pin_name_a_header_in_a_raw_image(tmp_path: Path) -> None:
    """A qcow2 image declared raw: the exact mistake serve refuses, said before serving."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "vm.img"), "4M"])
    image = str(tmp_path / "vm.img")
    result = nbdguard("inspect", image, "--format", "raw", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (report["refused"], report["existing_header"]) == (None, "qcow2")
    text = nbdguard("inspect", image, "--format", "raw")
    assert text.returncode == 1
    assert "EXISTING HEADER: sector 0 is a qcow2 header" in text.stdout
    assert 'format = "qcow2"' in text.stdout and 'on_existing_header = "warn"' in text.stdout
    pinned = nbdguard("pin", image, "--format", "raw")
    assert pinned.returncode == 1 and pinned.stdout == ""
    assert f"{image}: sector 0 is a qcow2 header" in pinned.stderr
    # Declared right, the same image is fine.
    right = nbdguard("inspect", image, "--format", "qcow2", "--json")
    assert right.returncode == 0 and json.loads(right.stdout)["existing_header"] is None


def test_inspect_passes_a_raw_image_without_a_header(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xeb\x63\x90" + bytes(4093))  # a boot sector is no image header
    result = nbdguard("inspect", str(image), "--format", "raw", "--json")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["existing_header"] is None
