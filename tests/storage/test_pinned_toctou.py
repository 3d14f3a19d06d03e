"""The allow-list holds on the descriptor actually opened, even while paths are swapped."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import pytest

from nbdguard.errors import ChainRefused
from nbdguard.storage.pinned import open_pinned

RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _race(tmp_path: Path, named: Path, a: Path, b: Path, allowed: Path, outside: Path) -> None:
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            _exchange(a, b)

    bad = _identity(outside)
    thread = threading.Thread(target=swapper)
    thread.start()
    outcomes: set[str] = set()
    try:
        for _ in range(2000):
            try:
                opened = open_pinned(
                    named, read_only=True, export="e", lock=False, allowed=[allowed]
                )
            except ChainRefused as err:
                assert err.reason in {"outside_allow_dirs", "changed_during_open", "open_failed"}
                outcomes.add(err.reason)
                continue
            try:
                assert opened.identity != bad
                assert os.fstat(opened.fd)[1] != bad[1]
                outcomes.add("opened")
            finally:
                opened.close()
    finally:
        stop.set()
        thread.join()
    assert "opened" in outcomes or outcomes  # the loop ran


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "inside.raw").write_bytes(b"in" * 512)
    (outside / "secret.raw").write_bytes(b"no" * 512)
    return allowed, outside


def test_symlink_exchange_race_never_opens_outside(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    (allowed / "img").symlink_to(allowed / "inside.raw")
    (allowed / "other").symlink_to(outside / "secret.raw")
    _race(tmp_path, allowed / "img", allowed / "img", allowed / "other", allowed,
          outside / "secret.raw")  # fmt: skip


def test_directory_exchange_race_never_opens_outside(
    tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    allowed, outside = dirs
    (allowed / "sub").mkdir()
    (allowed / "sub" / "x.raw").write_bytes(b"in" * 512)
    (outside / "x.raw").write_bytes(b"no" * 512)
    (allowed / "sublink").symlink_to(outside)
    _race(tmp_path, allowed / "sub" / "x.raw", allowed / "sub", allowed / "sublink", allowed,
          outside / "x.raw")  # fmt: skip


def _refused(path: Path, allowed: Path) -> str:
    with pytest.raises(ChainRefused) as caught:
        open_pinned(path, read_only=True, export="e", lock=False, allowed=[allowed])
    return caught.value.reason


def test_symlink_component_inside_is_followed(dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    (allowed / "d").mkdir()
    (allowed / "d" / "f.raw").write_bytes(b"x")
    (allowed / "link").symlink_to("d")
    opened = open_pinned(
        allowed / "link" / "f.raw", read_only=True, export="e", lock=False, allowed=[allowed]
    )
    try:
        assert opened.path == allowed / "d" / "f.raw"
    finally:
        opened.close()


def test_symlink_component_outside_refused(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    (allowed / "link").symlink_to(outside)
    assert _refused(allowed / "link" / "secret.raw", allowed) == "outside_allow_dirs"


def test_dotdot_escape_refused(dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    assert _refused(allowed / ".." / "outside" / "secret.raw", allowed) == "outside_allow_dirs"


def test_absolute_symlink_outside_refused(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    (allowed / "abs").symlink_to(outside / "secret.raw")
    assert _refused(allowed / "abs", allowed) == "outside_allow_dirs"


def test_non_allowed_final_target_refused(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    assert _refused(outside / "secret.raw", allowed) == "outside_allow_dirs"


def test_swapped_component_is_changed_during_open(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed, outside = dirs
    (allowed / "sub").mkdir()
    (allowed / "sub" / "secret.raw").write_bytes(b"in")
    real = os.path.realpath
    swapped = False

    def realpath_then_swap(path: object, *args: object, **kwargs: object) -> str:
        nonlocal swapped
        result = real(path)  # type: ignore[call-overload]
        if not swapped:
            swapped = True
            os.rename(allowed / "sub", allowed / "gone")
            (allowed / "sub").symlink_to(outside)
        return str(result)

    monkeypatch.setattr(os.path, "realpath", realpath_then_swap)
    assert _refused(allowed / "sub" / "secret.raw", allowed) == "changed_during_open"
