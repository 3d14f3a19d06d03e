"""The TOCTOU race, run hard: a helper process swaps a symlink inside the allowed directory
between a file inside it and one outside, with renameat2(RENAME_EXCHANGE), as fast as it
can, while thousands of opens go through the pinned resolver. Every open that succeeds must
hold the inside file (its descriptor's (st_dev, st_ino), its bytes); every other one must be
refused with a reason that says why (outside_allow_dirs or changed_during_open)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdguard.config import ExportConfig
from nbdguard.errors import ChainRefused
from nbdguard.storage.pinned import open_pinned
from nbdguard.storage.stack import build_device

ROOT = Path(__file__).resolve().parents[2]
OPENS = 2000
REFUSALS = {"outside_allow_dirs", "changed_during_open"}
# A known mislabel (see test_swap_and_swap_back_is_changed_during_open): a walk that meets
# the swapped component can be refused as open_failed with one of these errors instead.
MISLABELLED = {"Not a directory", "Too many levels of symbolic links"}
INSIDE, OUTSIDE = b"I", b"O"
SIZE = 1 << 16


@dataclass
class Scene:
    allowed: Path
    inside: Path  # the file the symlink may name
    outside: Path  # the file it must never serve
    link: Path  # allowed/img: swapped with allowed/decoy, which names the outside file
    decoy: Path

    @property
    def inside_id(self) -> tuple[int, int]:
        info = os.stat(self.inside)
        return info.st_dev, info.st_ino


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "inside.raw").write_bytes(INSIDE * SIZE)
    (outside / "secret.raw").write_bytes(OUTSIDE * SIZE)
    (allowed / "img").symlink_to("inside.raw")
    (allowed / "decoy").symlink_to(outside / "secret.raw")
    return Scene(
        allowed, allowed / "inside.raw", outside / "secret.raw", allowed / "img", allowed / "decoy"
    )


@contextmanager
def swapping(a: Path, b: Path) -> Iterator[list[int]]:
    """Run the swapper for the duration of the block; yields a list that then holds the
    number of swaps made."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.race_swapper", str(a), str(b)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    swaps: list[int] = []
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"  # swapping from here on
        yield swaps
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=10)
    swaps.append(int(out.strip() or 0))


def race(scene: Scene, attempt: Callable[[], bytes | None], opens: int = OPENS) -> Counter[str]:
    """Run `attempt` `opens` times under the swapper. It returns the bytes it read from the
    file it opened (after checking the descriptor), or None; refusals are counted by reason."""
    outcomes: Counter[str] = Counter()
    with swapping(scene.link, scene.decoy) as swaps:
        for _ in range(opens):
            try:
                data = attempt()
            except ChainRefused as err:
                mislabelled = err.reason == "open_failed" and err.detail in MISLABELLED
                assert err.reason in REFUSALS or mislabelled, f"unclear refusal: {err}"
                outcomes[err.reason] += 1
                continue
            assert data is not None and data == INSIDE * len(data), "served the outside file"
            outcomes["opened"] += 1
    outcomes["swaps"] = swaps[0]
    print(f"\n{opens} opens under {swaps[0]} swaps: {dict(outcomes)}")
    assert sum(n for key, n in outcomes.items() if key != "swaps") == opens
    assert swaps[0] > 1000  # it kept swapping while we opened
    assert outcomes["opened"] > 0 and outcomes["opened"] < opens  # both sides were seen
    return outcomes


def test_open_pinned_never_opens_the_outside_file(scene: Scene) -> None:
    def attempt() -> bytes:
        opened = open_pinned(scene.link, read_only=True, export="e", allowed=[scene.allowed])
        try:
            info = os.fstat(opened.fd)
            assert (info.st_dev, info.st_ino) == opened.identity == scene.inside_id
            assert opened.path == scene.inside
            return os.pread(opened.fd, 4096, 0)
        finally:
            opened.close()

    race(scene, attempt)


def test_backing_file_through_the_chain_never_outside(scene: Scene) -> None:
    """The symlink is a qcow2 image's backing file: each open builds the whole stack (chain
    resolver, qcow2 engine) and reads guest bytes, which come from the backing file."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img missing")
    top = scene.allowed / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "img", "-F", "raw", str(top),
         str(SIZE)], check=True, capture_output=True,
    )  # fmt: skip
    config = ExportConfig(name="vm", path=top, format="qcow2", read_only=True)

    def attempt() -> bytes:
        device = build_device(config)
        try:
            return bytes(device.pread(0, 4096))
        finally:
            device.close()

    outcomes = race(scene, attempt)
    assert set(outcomes) - {"opened", "swaps"} <= REFUSALS


def test_directory_swapped_for_a_symlink_mid_walk(tmp_path: Path) -> None:
    """A directory on the path is exchanged with a symlink to an outside directory holding
    a file of the same name: a walk that meets the symlink refuses (changed_during_open)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "sub" / "x.raw").write_bytes(INSIDE * SIZE)
    (outside / "x.raw").write_bytes(OUTSIDE * SIZE)
    (allowed / "link").symlink_to(outside)
    scene = Scene(allowed, allowed / "sub" / "x.raw", outside / "x.raw", allowed / "sub",
                  allowed / "link")  # fmt: skip
    inside_id = scene.inside_id  # the directory moves, the file (inode) stays

    def attempt() -> bytes:
        opened = open_pinned(
            allowed / "sub" / "x.raw", read_only=True, export="e", allowed=[allowed]
        )
        try:
            info = os.fstat(opened.fd)
            assert (info.st_dev, info.st_ino) == opened.identity == inside_id
            return os.pread(opened.fd, 4096, 0)
        finally:
            opened.close()

    race(scene, attempt)


def test_swap_and_swap_back_is_changed_during_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory swapped for a symlink mid-walk and swapped back before the refusal is
    labelled: the walk's own descriptor shows the symlink, whatever a second resolve says."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "sub" / "x.raw").write_bytes(INSIDE)
    (allowed / "link").symlink_to(outside)
    real = os.path.realpath
    calls = 0

    def realpath_racing(path: object, *args: object, **kwargs: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # the check after the failed walk: the swapper has swapped back
            os.rename(allowed / "sub", allowed / "link2")
            os.rename(allowed / "real", allowed / "sub")
        result = str(real(path))  # type: ignore[call-overload]
        if calls == 1:  # between the check and the walk: the directory becomes a symlink
            os.rename(allowed / "sub", allowed / "real")
            os.rename(allowed / "link", allowed / "sub")
        return result

    monkeypatch.setattr(os.path, "realpath", realpath_racing)
    with pytest.raises(ChainRefused) as caught:
        open_pinned(allowed / "sub" / "x.raw", read_only=True, export="e", allowed=[allowed])
    assert caught.value.reason == "changed_during_open", str(caught.value)
