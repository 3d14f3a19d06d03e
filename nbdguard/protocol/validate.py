"""Validate a transmission request once, at the edge, against what was negotiated.

Inner layers trust what passes here: the range lies inside the export, flags
are ones the command takes, writes target a writable export, and payloads fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdguard.protocol.constants import Command, CommandFlag, NBDError, TransmissionFlag
from nbdguard.protocol.transmission import Request


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The parts of a negotiated session that bound requests."""

    size: int
    read_only: bool
    structured_replies: bool
    has_meta_context: bool
    max_payload: int

    @classmethod
    def for_export(
        cls, size: int, flags: int, structured: bool, contexts: int, max_payload: int
    ) -> SessionLimits:
        read_only = bool(flags & TransmissionFlag.READ_ONLY)
        return cls(size, read_only, structured, contexts > 0, max_payload)


_ALLOWED_FLAGS: dict[int, int] = {
    Command.READ: CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: 0,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.REQ_ONE,
}
# This runs once per request: plain ints, not enum members (an IntFlag `&` builds a new
# enum object each time).
_FORBIDDEN_FLAGS = {int(command): ~int(flags) for command, flags in _ALLOWED_FLAGS.items()}
_MODIFYING = frozenset(int(c) for c in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES))
_GROWING = frozenset(int(c) for c in (Command.WRITE, Command.WRITE_ZEROES))  # past end: ENOSPC
_RANGED = frozenset(
    int(c)
    for c in (
        Command.READ,
        Command.WRITE,
        Command.TRIM,
        Command.CACHE,
        Command.WRITE_ZEROES,
        Command.BLOCK_STATUS,
    )
)
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)
_DF = int(CommandFlag.DF)
_OK, _EINVAL, _EPERM, _ENOSPC, _EOVERFLOW = (
    NBDError.OK,
    NBDError.EINVAL,
    NBDError.EPERM,
    NBDError.ENOSPC,
    NBDError.EOVERFLOW,
)


def validate(request: Request, limits: SessionLimits) -> NBDError:
    """Return the error the request must be answered with, or NBDError.OK."""
    command = request.command
    forbidden = _FORBIDDEN_FLAGS.get(command)
    if forbidden is None or request.flags & forbidden:
        return _EINVAL
    if command in _MODIFYING and limits.read_only:
        return _EPERM
    if command == _READ:
        if request.flags & _DF and not limits.structured_replies:
            return _EINVAL
        if request.length > limits.max_payload:
            return _EOVERFLOW
    elif command == _WRITE:
        if request.length > limits.max_payload:
            return _EINVAL  # its payload is still received (and dropped): the stream stays framed
    elif command == _BLOCK_STATUS and (not limits.has_meta_context or not request.length):
        return _EINVAL
    if command in _RANGED and request.offset + request.length > limits.size:
        return _ENOSPC if command in _GROWING else _EINVAL
    return _OK
