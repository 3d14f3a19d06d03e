from __future__ import annotations

from collections.abc import Iterable

import pytest

from nbdguard.protocol.constants import TransmissionFlag as TF
from nbdguard.protocol.handshake import ExportInfo

FLAGS = int(TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_DF | TF.CAN_MULTI_CONN)


class Directory:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}
        self.refusals: dict[str, str] = {}

    def visible_exports(self) -> Iterable[ExportInfo]:
        return list(self.exports.values())

    def find(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def admit(self, name: str) -> str | None:
        return self.refusals.get(name)


def make_export(name: str = "vm1", size: int = 1 << 20, description: str = "") -> ExportInfo:
    return ExportInfo(name, description, size, FLAGS, 1, 4096, 32 << 20)


@pytest.fixture
def directory() -> Directory:
    return Directory(make_export("vm1", description="web disk"), make_export("", size=4096))
