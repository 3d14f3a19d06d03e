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
_MODIFYING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_GROWING = frozenset({Command.WRITE, Command.WRITE_ZEROES})  # past the end: ENOSPC
_RANGED = frozenset(
    {
        Command.READ,
        Command.WRITE,
        Command.TRIM,
        Command.CACHE,
        Command.WRITE_ZEROES,
        Command.BLOCK_STATUS,
    }
)


def validate(request: Request, limits: SessionLimits) -> NBDError:
    """Return the error the request must be answered with, or NBDError.OK."""
    command = request.command
    allowed = _ALLOWED_FLAGS.get(command)
    if allowed is None or request.flags & ~int(allowed):
        return NBDError.EINVAL
    if request.oversized:
        return NBDError.EINVAL
    if command in _MODIFYING and limits.read_only:
        return NBDError.EPERM
    if command == Command.READ:
        if request.flags & CommandFlag.DF and not limits.structured_replies:
            return NBDError.EINVAL
        if request.length > limits.max_payload:
            return NBDError.EOVERFLOW
    if command == Command.BLOCK_STATUS and (not limits.has_meta_context or not request.length):
        return NBDError.EINVAL
    if command in _RANGED and request.offset + request.length > limits.size:
        return NBDError.ENOSPC if command in _GROWING else NBDError.EINVAL
    return NBDError.OK
