"""The pinned-chain resolver: every file an export reads is decided here, once, at open.

An image never decides which files get opened or in what format: a backing layer's format
must be stated (by the header's backing-format extension or by the config's `backing`
pins, which must then agree), its path must resolve inside the top image's directory or an
`allow_dirs` entry, protocol names (`json:`, `nbd:`, ...) are refused, and each file is
opened exactly once through `open_pinned` and held. Refusals are `ChainRefused` errors with
a stable reason label:

protocol_name, format_missing, unsupported_format, pin_mismatch, outside_allow_dirs, cycle,
too_deep, not_regular_file, open_failed, locked, encrypted, unsupported_feature, corrupt,
dirty, bad_header, changed_during_open

The allow-list holds on the descriptor actually opened (see `open_pinned`): a path that is
swapped between its check and its open is refused as changed_during_open.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nbdguard.config import FORMATS, BackingPin, ExportConfig, Format
from nbdguard.errors import ChainRefused
from nbdguard.storage.pinned import OpenedFile, check_allowed, open_pinned
from nbdguard.storage.qcow2.header import (
    CORRUPT,
    DIRTY,
    MAX_CLUSTER_BITS,
    HeaderError,
    Qcow2Header,
    parse_header,
)

REASONS = (
    "protocol_name", "format_missing", "unsupported_format", "pin_mismatch",
    "outside_allow_dirs", "cycle", "too_deep", "not_regular_file", "open_failed", "locked",
    "encrypted", "unsupported_feature", "corrupt", "dirty", "bad_header",
    "changed_during_open",
)  # fmt: skip


@dataclass(slots=True)
class ChainLayer:
    """One opened file of the chain; layer 0 is the image the export names."""

    index: int
    named: Path  # as named (relative backing names resolve against its directory)
    file: OpenedFile
    format: Format
    format_source: str  # "config", "header", "pin" or "header+pin"
    header: Qcow2Header | None = None
    data_file: OpenedFile | None = None

    def close(self) -> None:
        if self.data_file is not None:
            self.data_file.close()
        self.file.close()


@dataclass(slots=True)
class Chain:
    export: str
    layers: list[ChainLayer] = field(default_factory=list)

    def close(self) -> None:
        for layer in self.layers:
            layer.close()


def is_protocol_name(name: str) -> bool:
    """QEMU reads `proto:...` (json:, nbd:, file:, even foo:bar.qcow2) as a driver spec when
    a ':' comes before the first '/'; such names are never followed."""
    return ":" in name.split("/", 1)[0]


def resolve_chain(config: ExportConfig, *, lock: bool = True) -> Chain:
    """Open the export's whole chain or raise ChainRefused; nothing stays open on failure."""
    resolver = ChainResolver(config, lock=lock)
    try:
        resolver.run()
    except BaseException:
        resolver.chain.close()
        raise
    return resolver.chain


class ChainResolver:
    """Resolves layer by layer; after a refusal, `chain` still describes the layers opened
    before it (the caller closes them)."""

    def __init__(self, config: ExportConfig, *, lock: bool) -> None:
        self.config = config
        self.lock = lock
        self.chain = Chain(config.name)
        self.seen: set[tuple[int, int]] = set()
        self.extra_allowed = tuple(Path(os.path.realpath(d)) for d in config.allow_dirs)
        # Set once the top image is open: the directory it was actually opened in.
        self.allowed: tuple[Path, ...] = ()

    def refuse(self, layer: int, path: Path | str, reason: str, detail: str) -> ChainRefused:
        return ChainRefused(self.config.name, layer, str(path), reason, detail)

    def run(self) -> None:
        named, fmt, source = self.config.path, self.config.format, "config"
        while True:
            layer = self.open_layer(len(self.chain.layers), named, fmt, source)
            self.chain.layers.append(layer)
            below = self.backing_of(layer)
            if below is None:
                return
            named, fmt, source = below

    def open_layer(self, index: int, named: Path, fmt: Format, source: str) -> ChainLayer:
        if index + 1 > self.config.max_chain_depth:
            raise self.refuse(
                index,
                named,
                "too_deep",
                f"the chain is deeper than max_chain_depth = {self.config.max_chain_depth}",
            )
        writable = index == 0 and not self.config.read_only
        opened = self.open_file(index, named, writable=writable, regular_only=index > 0)
        if index == 0:
            self.allowed = (opened.path.parent, *self.extra_allowed)
        layer = ChainLayer(index, named, opened, fmt, source)
        try:
            if fmt == "qcow2":
                layer.header = self.read_header(index, opened)
                self.check_writable(index, opened, layer.header)
                if layer.header.data_file_name is not None:
                    layer.data_file = self.open_data_file(index, named, layer.header, writable)
        except BaseException:
            layer.close()  # not in the chain yet: chain.close() would not reach it
            raise
        return layer

    def open_file(
        self, index: int, named: Path, *, writable: bool, regular_only: bool
    ) -> OpenedFile:
        opened = open_pinned(
            named,
            read_only=not writable,
            export=self.config.name,
            layer=index,
            regular_only=regular_only,
            lock=self.lock,
            already_open=self.seen,
            allowed=self.allowed or None,  # empty only for the top image itself
        )
        self.seen.add(opened.identity)
        return opened

    def check_allowed(self, index: int, named: Path) -> None:
        """An early check by path, for the message; open_pinned checks again on the fd."""
        check_allowed(named, self.allowed, export=self.config.name, layer=index)

    def read_header(self, index: int, opened: OpenedFile) -> Qcow2Header:
        data = os.pread(opened.fd, min(opened.size, 1 << MAX_CLUSTER_BITS), 0)
        try:
            return parse_header(data, opened.size)
        except HeaderError as err:
            raise self.refuse(index, opened.path, err.reason, err.detail) from None

    def check_writable(self, index: int, opened: OpenedFile, header: Qcow2Header) -> None:
        if opened.read_only:
            return
        if header.incompatible & CORRUPT:
            raise self.refuse(
                index, opened.path, "corrupt", "marked corrupt: it may only be served read-only"
            )
        if header.incompatible & DIRTY:
            raise self.refuse(
                index,
                opened.path,
                "dirty",
                "marked dirty (lazy refcounts): repair it with `qemu-img check -r all` first, "
                "or serve it read-only",
            )

    def open_data_file(
        self, index: int, named: Path, header: Qcow2Header, writable: bool
    ) -> OpenedFile:
        name = header.data_file_name
        assert name is not None
        if is_protocol_name(name):
            raise self.refuse(index, name, "protocol_name", "data file name is a protocol spec")
        path = named.parent / name
        self.check_allowed(index, path)
        return self.open_file(index, path, writable=writable, regular_only=True)

    def backing_of(self, layer: ChainLayer) -> tuple[Path, Format, str] | None:
        """Where the layer below lives and its format, or None at the bottom."""
        below = layer.index + 1
        pins = self.config.backing
        pin = pins[layer.index] if pins is not None and layer.index < len(pins) else None
        name = layer.header.backing_name if layer.header is not None else None
        if name is None:
            if pin is not None:
                raise self.refuse(
                    layer.index,
                    layer.file.path,
                    "pin_mismatch",
                    f"has no backing file, but the config pins {pin.path} below it",
                )
            return None
        if is_protocol_name(name):
            raise self.refuse(
                below, name, "protocol_name", "backing name is a protocol or json: spec"
            )
        if pins is not None and pin is None:
            raise self.refuse(
                below, name, "pin_mismatch", "the chain is longer than the config's backing list"
            )
        path = layer.named.parent / name
        fmt, source = self.backing_format(below, path, layer.header, pin)
        if pin is not None and os.path.realpath(pin.path) != os.path.realpath(path):
            raise self.refuse(
                below, path, "pin_mismatch", f"the header names it, but the config pins {pin.path}"
            )
        self.check_allowed(below, path)
        return path, fmt, source

    def backing_format(
        self, below: int, path: Path, header: Qcow2Header | None, pin: BackingPin | None
    ) -> tuple[Format, str]:
        stated = header.backing_format if header is not None else None
        if stated is not None and pin is not None and stated != pin.format:
            raise self.refuse(
                below,
                path,
                "pin_mismatch",
                f"the header says format {stated!r}, the config pins {pin.format!r}",
            )
        if pin is not None:
            return pin.format, "header+pin" if stated else "pin"
        if stated is None:
            raise self.refuse(
                below,
                path,
                "format_missing",
                "the backing format is stated neither in the image header nor in the config "
                "(nothing is probed: add a backing list to the export, or run "
                "`qemu-img rebase -u -F FMT`)",
            )
        known = next((fmt for fmt in FORMATS if fmt == stated), None)
        if known is None:
            raise self.refuse(
                below, path, "unsupported_format", f"backing format {stated!r} is not raw or qcow2"
            )
        return known, "header"
