"""Byte access to one file of a qcow2 layer (the image itself or its external data file).

Reads are preads into memory the process owns, never views of a mapping: a read reply can
wait in the output queue for as long as the client takes to read it, and a cluster it came
from may meanwhile be discarded, freed and handed to another guest offset. (Large reads of
data clusters leave as file ranges instead, which the image rechecks before they are sent:
see Qcow2Image.read_range.) Writes use pwrite (ENOSPC, not SIGBUS, on a full disk). Bytes
past the end of the file read as zeros: a writable image grows as clusters are allocated.
"""

from __future__ import annotations

import os

from nbdguard.storage import fileops
from nbdguard.storage.device import Buffer
from nbdguard.storage.pinned import OpenedFile


class HostFile:
    def __init__(self, file: OpenedFile) -> None:
        self.file = file
        self.fd = file.fd
        self.size = file.size

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; bytes past the end of the file read as zeros."""
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def read_into(self, target: memoryview, offset: int) -> None:
        got = os.preadv(self.fd, [target], offset)
        if got < len(target):
            target[got:] = bytes(len(target) - got)

    def write(self, data: Buffer, offset: int) -> None:
        fileops.write_all(self.fd, data, offset)
        self.size = max(self.size, offset + len(data))

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        """Nothing to release: the descriptor belongs to the chain, which closes it."""
