"""The sector-zero guard for a qcow2 image's external data file.

With an external data file QEMU places guest cluster N at data-file cluster N
(`do_alloc_cluster_offset`: host offset = guest offset), and so does nbdguard. Guest offset 0
is therefore data-file offset 0, and a guest that writes a qcow2 header there turns the data
file into a "qcow2 image" with a backing file of its choice for any tool that later opens
the data file without pinning its format - which the `data_file_raw` bit ("this file is a
valid raw image") invites. QEMU does not guard this (it opens the data file as a protocol
node, never probed); nbdguard protects the data file's sector 0 exactly as a raw export's:

- `DataFileGuard` is the raw export's `Sector0Guard` over the qcow2 top layer: guest writes,
  zeroes and trims reaching bytes 0-511 are read-modify-written, checked against the
  export's rule set and `allow_headers`, and refused whole (EPERM, nothing written) under
  the export lock and an OFD lock on the data file's first bytes; the dispatcher audits the
  refusal (`guard.header_write_blocked`, `nbdguard_header_writes_blocked_total`) with the
  export's labels, as for a raw export.
- `GuardedDataFile` is the data file's byte access under the engine: a backstop that refuses
  any write whose bytes would make the data file's own sector 0 match, whatever guest offset
  it came from. A hostile image's L2 entry may map another guest cluster onto data-file
  cluster 0, and the guest's view of its sector 0 is then not what lands there. It runs
  under the image's own lock (every write of the export is serialized there); other writers
  of the file are excluded by the image lock the chain holds.

Both apply to every external data file, whether or not `data_file_raw` is set: the layout is
the identity either way (the bit only promises that unallocated and zero clusters read the
same through the file), nbdguard does not maintain the bit and clears it when it opens the
image writable (the autoclear rule), so a guard keyed on the bit would protect only the first
time an image is served, and probing tools look at the bytes, never at the bit.
"""

from __future__ import annotations

from collections.abc import Callable

from nbdguard.guard.sector0 import (
    SECTOR,
    BlockedReport,
    FileLock,
    GuardPolicy,
    Sector0Guard,
    report_refusal,
)
from nbdguard.storage.device import BlockDevice, Buffer
from nbdguard.storage.pinned import OpenedFile
from nbdguard.storage.qcow2.hostfile import HostFile


class DataFileGuard(Sector0Guard):
    """The sector-zero guard of a qcow2 export whose top layer has an external data file."""

    def __init__(
        self,
        inner: BlockDevice,
        policy: GuardPolicy,
        data_file: OpenedFile,
        *,
        file_lock: FileLock,
        on_rmw: Callable[[], None],
        on_lock_timeout: Callable[[], None],
        on_blocked: BlockedReport,
    ) -> None:
        super().__init__(
            inner,
            policy,
            file_lock=file_lock,
            on_rmw=on_rmw,
            on_lock_timeout=on_lock_timeout,
            on_blocked=on_blocked,
        )
        self.data_file = data_file

    def existing_header(self) -> str | None:
        """What the data file itself holds (not the guest's view, which may differ where the
        qcow2 metadata leaves cluster 0 unallocated or zero)."""
        return self.policy.detect(HostFile(self.data_file).read(0, SECTOR))


class GuardedDataFile(HostFile):
    """An external data file whose sector 0 never becomes an image-format header."""

    def __init__(self, file: OpenedFile, policy: GuardPolicy, on_blocked: BlockedReport) -> None:
        super().__init__(file)
        self.policy = policy
        self._on_blocked = on_blocked

    def write(self, data: Buffer, offset: int) -> None:
        if offset < SECTOR:
            self._check_head(data, offset)
        super().write(data, offset)

    def _check_head(self, data: Buffer, offset: int) -> None:
        """The raw guard's rule: a write may not change sector 0 into a header (rewriting
        the bytes already there is no change)."""
        view = memoryview(data).cast("B")
        stop = min(offset + len(view), SECTOR)
        original = self.read(0, SECTOR)
        sector = bytearray(original)
        sector[offset:stop] = view[: stop - offset]
        if sector == original:
            return
        detected = self.policy.detect(sector)
        if detected is not None:  # the guest offset is not known here: the host offset is
            request = ("write", offset, len(view))
            raise report_refusal(self._on_blocked, detected, sector, request)
