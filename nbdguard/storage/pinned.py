"""The one owner of every open() of an image file.

A path is resolved once (symlinks are followed only here, by realpath), checked against
the allowed directories, and then opened by walking the symlink-free result from a held
descriptor of the allowed directory, one component at a time with O_NOFOLLOW and never
through '..'. A symlink met during that walk means the path changed after it was checked:
it is refused (reason `changed_during_open`), never followed. After the open, the
descriptor's /proc/self/fd target must still be the checked path and name the same
(st_dev, st_ino), so the allow-list holds on the file actually opened, not on a path that
may have been swapped since. The file is then locked and held for the export's lifetime.
Nothing here looks at file contents to decide a format.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Sequence, Set
from dataclasses import dataclass
from pathlib import Path

from nbdguard.errors import ChainRefused
from nbdguard.storage.locks import LockConflict, lock_image


@dataclass(frozen=True, slots=True)
class OpenedFile:
    """An open, checked and locked image file."""

    path: Path  # resolved, symlink-free
    fd: int
    size: int
    block_device: bool
    read_only: bool
    identity: tuple[int, int]  # (st_dev, st_ino): the same file reached twice is a cycle

    def close(self) -> None:
        os.close(self.fd)


def open_pinned(
    path: Path,
    *,
    read_only: bool,
    export: str,
    layer: int = 0,
    regular_only: bool = False,
    lock: bool = True,
    already_open: Set[tuple[int, int]] = frozenset(),
    allowed: Sequence[Path] | None = None,
) -> OpenedFile:
    """Open one file of an export's chain, or raise ChainRefused saying exactly why not.

    O_NONBLOCK keeps a FIFO from blocking the open; the descriptor is then refused
    as not a regular file. Block devices are accepted unless `regular_only`. `lock=False`
    is for inspecting an image that may be in use, never for serving it. A file whose
    (st_dev, st_ino) is in `already_open` is a cycle, refused before locking (our own lock
    on its first open would otherwise make it look locked by someone else).

    `allowed` lists the symlink-free directories the file must lie in (None: the directory
    it resolves into, as for the image an export names); the check holds on the opened
    descriptor, and a path swapped during the open is refused as `changed_during_open`.
    """
    if allowed is None:
        resolved = _realpath(path, export=export, layer=layer)
        base = resolved.parent
    else:
        resolved, base = check_allowed(path, allowed, export=export, layer=layer)
    flags = os.O_RDONLY if read_only else os.O_RDWR
    flags |= os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = _open_beneath(path, resolved, base, flags, export=export, layer=layer)
    try:
        _confirm(fd, path, resolved, export=export, layer=layer)
        info = os.fstat(fd)
        block_device = stat.S_ISBLK(info.st_mode)
        if not (stat.S_ISREG(info.st_mode) or (block_device and not regular_only)):
            wanted = "a regular file" if regular_only else "a regular file or block device"
            raise ChainRefused(export, layer, str(resolved), "not_regular_file", f"not {wanted}")
        if (info.st_dev, info.st_ino) in already_open:
            detail = "this file already appears in the chain"
            raise ChainRefused(export, layer, str(path), "cycle", detail)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if lock:
            _lock(fd, resolved, read_only=read_only, export=export, layer=layer)
        size = os.lseek(fd, 0, os.SEEK_END) if block_device else info.st_size
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(resolved, fd, size, block_device, read_only, (info.st_dev, info.st_ino))


def _open_beneath(
    path: Path, resolved: Path, base: Path, flags: int, *, export: str, layer: int
) -> int:
    """Open `resolved` by walking it from a held descriptor of `base`, following nothing."""
    parts = resolved.relative_to(base).parts
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        current = os.open(base, dir_flags | os.O_NOFOLLOW)
    except OSError as err:
        raise _open_error(err, path, resolved, export=export, layer=layer) from err
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            try:
                opened = os.open(part, flags if last else dir_flags | os.O_NOFOLLOW, dir_fd=current)
            except OSError as err:
                if not last and _is_link(part, current):  # resolved: no symlink there
                    raise _changed(path, resolved, export=export, layer=layer) from err
                raise _open_error(err, path, resolved, export=export, layer=layer) from err
            os.close(current)
            current = opened
        if not parts:  # the allowed directory itself
            raise ChainRefused(export, layer, str(path), "not_regular_file", "a directory")
    except BaseException:
        os.close(current)
        raise
    return current


def _open_error(
    err: OSError, path: Path, resolved: Path, *, export: str, layer: int
) -> ChainRefused:
    if err.errno in (errno.ELOOP, errno.ENOTDIR) and (
        _realpath(path, export=export, layer=layer) != resolved
        or (err.errno == errno.ELOOP and not os.path.islink(resolved))
    ):  # realpath found no symlink there a moment ago
        return _changed(path, resolved, export=export, layer=layer)
    reason = "not_regular_file" if err.errno == errno.EISDIR else "open_failed"
    return ChainRefused(export, layer, str(path), reason, err.strerror or str(err))


def _is_link(part: str, directory: int) -> bool:
    """A walked directory component is a symlink now (seen from the held descriptor, not
    by resolving the path again, which a swap back would hide)."""
    try:
        return stat.S_ISLNK(os.stat(part, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _changed(path: Path, resolved: Path, *, export: str, layer: int) -> ChainRefused:
    detail = f"the path changed while it was being opened (it resolved to {resolved} before)"
    return ChainRefused(export, layer, str(path), "changed_during_open", detail)


def _confirm(fd: int, path: Path, resolved: Path, *, export: str, layer: int) -> None:
    """The descriptor must still be the checked path: its /proc target and identity."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        named = os.stat(target, follow_symlinks=False)
    except OSError:
        raise _changed(path, resolved, export=export, layer=layer) from None
    held = os.fstat(fd)
    if target != str(resolved) or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
        raise _changed(path, resolved, export=export, layer=layer)


def check_allowed(
    path: Path, allowed: Sequence[Path], *, export: str, layer: int
) -> tuple[Path, Path]:
    """The symlink-free path and the allowed directory it lies in, or ChainRefused."""
    resolved = _realpath(path, export=export, layer=layer)
    for directory in allowed:
        if resolved.is_relative_to(directory):
            return resolved, directory
    names = ", ".join(str(directory) for directory in allowed)
    raise ChainRefused(
        export,
        layer,
        str(path),
        "outside_allow_dirs",
        f"resolves to {resolved}, outside the image's directory and allow_dirs ({names})",
    )


def _realpath(path: Path, *, export: str, layer: int) -> Path:
    """realpath, whose readlink can fail when a symlink is swapped under it."""
    try:
        return Path(os.path.realpath(path))
    except OSError:
        raise _changed(path, Path(path), export=export, layer=layer) from None


def _lock(fd: int, resolved: Path, *, read_only: bool, export: str, layer: int) -> None:
    try:
        lock_image(fd, writable=not read_only)
    except LockConflict as err:
        raise ChainRefused(export, layer, str(resolved), "locked", str(err)) from err
