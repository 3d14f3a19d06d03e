"""Error types, and the one place where errno values become NBD wire errors."""

import errno

from nbdguard.protocol.constants import NBDError


class NbdguardError(Exception):
    """Base for errors that stop nbdguard from serving something (config, open, chain)."""


class ExportOpenError(NbdguardError):
    """An export's image could not be opened safely; the message names export and path.

    `reason` is a short stable label (metrics, logs, tests); the message says it in words.
    """

    reason: str = "refused"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ChainRefused(ExportOpenError):
    """One file of an export's chain (layer 0 is the image the export names) was refused."""

    def __init__(self, export: str, layer: int, path: str, reason: str, detail: str) -> None:
        self.export = export
        self.layer = layer
        self.path = path
        self.detail = detail
        super().__init__(
            f"export {export!r}: layer {layer} ({path}): {detail} [reason={reason}]",
            reason=reason,
        )


_ERRNO_TO_NBD: dict[int, NBDError] = {
    errno.EPERM: NBDError.EPERM,
    errno.EACCES: NBDError.EPERM,
    errno.EROFS: NBDError.EPERM,
    errno.EIO: NBDError.EIO,
    errno.ENOMEM: NBDError.ENOMEM,
    errno.EINVAL: NBDError.EINVAL,
    errno.ENOSPC: NBDError.ENOSPC,
    errno.EDQUOT: NBDError.ENOSPC,
    errno.EFBIG: NBDError.ENOSPC,
    errno.EOVERFLOW: NBDError.EOVERFLOW,
    errno.ENOTSUP: NBDError.ENOTSUP,
    errno.ESHUTDOWN: NBDError.ESHUTDOWN,
}


def nbd_error_for(err: BaseException) -> NBDError:
    """Fold an exception raised by a storage layer into the NBD error the client sees."""
    if isinstance(err, OSError) and err.errno is not None:
        return _ERRNO_TO_NBD.get(err.errno, NBDError.EIO)
    if isinstance(err, MemoryError):
        return NBDError.ENOMEM
    return NBDError.EIO


class Qcow2Corrupt(OSError):
    """A qcow2 image holds an impossible entry (QEMU's "corrupt"): the request fails with
    EIO, and the image marks itself corrupt and turns read-only. `kind` is a stable label."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        guest_offset: int | None = None,
        host_offset: int | None = None,
    ) -> None:
        super().__init__(errno.EIO, f"qcow2 image is corrupt ({kind}): {detail}")
        self.kind = kind
        self.detail = detail
        self.guest_offset = guest_offset
        self.host_offset = host_offset
        self.reported = False
