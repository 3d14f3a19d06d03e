"""`nbdguard inspect` and `nbdguard pin`: the chain exactly as `serve` would open it, without
serving it, and the `[[exports]]` stanza that pins it so an operator decides once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nbdguard.config import DEFAULT_MAX_CHAIN_DEPTH, ExportConfig, Format
from nbdguard.errors import ChainRefused
from nbdguard.guard.sector0 import SECTOR, GuardPolicy
from nbdguard.storage.chain import ChainLayer, ChainResolver
from nbdguard.storage.qcow2.check import check_image
from nbdguard.storage.qcow2.hostfile import HostFile


@dataclass(frozen=True, slots=True)
class ChainReport:
    layers: tuple[dict[str, object], ...]
    refused: ChainRefused | None
    # A raw top whose sector 0 already is an image header (the qemu rules): what `serve`
    # refuses by default, and most likely an image of that format declared raw.
    existing_header: str | None = None

    @property
    def servable(self) -> bool:
        """Whether `serve` would open it with the default settings."""
        return self.refused is None and self.existing_header is None

    def as_json(self) -> str:
        refused = None
        if self.refused is not None:
            refused = {
                "layer": self.refused.layer,
                "path": self.refused.path,
                "reason": self.refused.reason,
                "detail": self.refused.detail,
            }
        document = {
            "layers": list(self.layers),
            "refused": refused,
            "existing_header": self.existing_header,
        }
        return json.dumps(document, indent=2)

    def as_text(self) -> str:
        lines = []
        for layer in self.layers:
            lines.append(f"layer {layer['layer']}: {layer['path']}")
            for key, value in layer.items():
                if key == "check" and isinstance(value, dict):
                    lines += _check_lines(value)
                elif key not in ("layer", "path") and value is not None:
                    lines.append(f"  {key.replace('_', ' ')}: {value}")
        if self.refused is not None:
            lines.append(f"REFUSED: {self.refused}")
        if self.existing_header is not None:
            lines.append(f"EXISTING HEADER: {existing_header_advice(self.existing_header)}")
        return "\n".join(lines)


def existing_header_advice(found: str) -> str:
    """What a raw image whose sector 0 is a `found` header means, and what to do."""
    if found == "qcow2":
        fix = 'serve it as qcow2 (format = "qcow2", --format qcow2)'
    else:
        fix = f"convert it (qemu-img convert -f {found} -O qcow2)"
    return (
        f"sector 0 is a {found} header: if this is a {found} image, {fix}; if a guest wrote "
        'it, serve it raw only with on_existing_header = "warn"'
    )


def inspect_chain(
    path: Path,
    fmt: Format,
    *,
    allow_dirs: tuple[Path, ...] = (),
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
) -> ChainReport:
    """Resolve read-only and without taking locks, so an image in use can be inspected.
    Each qcow2 layer gets the full reference check (check_on_open = "full"'s findings)."""
    config = ExportConfig(
        name=path.name,
        path=path,
        format=fmt,
        read_only=True,
        allow_dirs=allow_dirs,
        max_chain_depth=max_chain_depth,
    )
    resolver = ChainResolver(config, lock=False)
    refused = None
    existing = None
    described: list[dict[str, object]] = []
    try:
        try:
            resolver.run()
            existing = _raw_existing_header(resolver.chain.layers[0])
        except ChainRefused as err:
            refused = err
        for layer in resolver.chain.layers:
            described.append(_describe(layer))
            if layer.header is not None:
                described[-1]["check"] = check_image(layer.header, HostFile(layer.file)).as_dict()
    finally:
        resolver.chain.close()
    return ChainReport(tuple(described), refused, existing)


def _raw_existing_header(top: ChainLayer) -> str | None:
    """The check `serve` makes on a raw export at open, on the descriptor already held."""
    if top.format != "raw":
        return None
    return GuardPolicy("qemu").detect(os.pread(top.file.fd, SECTOR, 0))


def _check_lines(check: dict[str, object]) -> list[str]:
    counts = check.get("counts")
    if not counts:
        return ["  check: no findings"]
    assert isinstance(counts, dict)
    shown = ", ".join(f"{count} {kind}" for kind, count in counts.items())
    lines = [f"  check: {shown} (qemu-img check: {check['leaks']} leaks, "
             f"{check['corruptions']} corruptions)"]  # fmt: skip
    findings = check.get("findings")
    assert isinstance(findings, list)
    lines += [f"    {finding}" for finding in findings]
    return lines


def _describe(layer: ChainLayer) -> dict[str, object]:
    header = layer.header
    described: dict[str, object] = {
        "layer": layer.index,
        "path": str(layer.file.path),
        "format": layer.format,
        "format_source": layer.format_source,
        "virtual_size": header.size if header is not None else layer.file.size,
    }
    qcow2_fields = ("cluster_size", "version", "backing_name", "backing_format", "data_file",
                    "compression", "extended_l2", "snapshots")  # fmt: skip
    described.update(dict.fromkeys(qcow2_fields))
    if header is not None:
        described.update(
            cluster_size=header.cluster_size,
            version=header.version,
            backing_name=header.backing_name,
            backing_format=header.backing_format,
            data_file=str(layer.data_file.path) if layer.data_file is not None else None,
            compression=header.compression,
            extended_l2=header.extended_l2,
            snapshots=header.nb_snapshots,
        )
    return described


def pin_stanza(report: ChainReport, name: str, path: Path) -> str:
    """The `[[exports]]` TOML that serves this chain with every layer pinned."""
    top = report.layers[0]
    top_dir = Path(str(top["path"])).parent
    outside = sorted(
        {
            str(Path(str(layer["path"])).parent)
            for layer in report.layers[1:]
            if not Path(str(layer["path"])).parent.is_relative_to(top_dir)
        }
    )
    lines = [
        "[[exports]]",
        f"name = {_toml(name)}",
        f"path = {_toml(os.path.abspath(path))}",
        f"format = {_toml(str(top['format']))}",
    ]
    if outside:
        lines.append("allow_dirs = [" + ", ".join(_toml(d) for d in outside) + "]")
    if top["format"] == "qcow2":
        lines.append("backing = [")
        lines += [
            f"    {{ path = {_toml(str(layer['path']))}, format = {_toml(str(layer['format']))} }},"
            for layer in report.layers[1:]
        ]
        lines.append("]")
    return "\n".join(lines) + "\n"


def _toml(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string
