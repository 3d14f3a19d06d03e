"""The config file: TOML turned into frozen dataclasses, validated whole and once.

Every problem in a file is collected and reported together, each naming the file,
the export and the key, so an operator fixes a config in one pass.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from nbdguard.guard.signatures import KNOWN_FORMATS

FORMATS = ("raw", "qcow2")
LOG_FORMATS = ("json", "console", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
GUARD_RULE_SETS = ("qemu", "strict", "off")
EXISTING_HEADER_ACTIONS = ("warn", "refuse")
DEFAULT_LISTEN = "tcp://127.0.0.1:10809"
MAX_STRING_BYTES = 4096

SERVER_KEYS = ("listen", "metrics_listen", "log_format", "log_level", "request_metrics")
EXPORT_KEYS = (
    "name",
    "path",
    "format",
    "read_only",
    "description",
    "header_guard",
    "allow_headers",
    "on_existing_header",
)
TOP_KEYS = ("server", "exports")


class ConfigError(Exception):
    """One or more problems in a config; `problems` lists each with its location."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[ListenAddress, ...]
    metrics_listen: tuple[str, int] | None = None
    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    request_metrics: bool = True  # per-request counters and latency histograms


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    path: Path
    format: Literal["raw", "qcow2"]
    read_only: bool = False
    description: str = ""
    header_guard: Literal["qemu", "strict", "off"] = "qemu"
    allow_headers: frozenset[str] = frozenset()
    on_existing_header: Literal["warn", "refuse"] = "warn"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    exports: tuple[ExportConfig, ...]
    source: Path | None = None

    def export(self, name: str) -> ExportConfig | None:
        return next((export for export in self.exports if export.name == name), None)


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` into (host, port)."""
    try:
        return _split_host_port(text)
    except ValueError as err:
        raise ValueError(f"{text!r}: {err}") from None


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [IPV6]:PORT")
        ipaddress.IPv6Address(host)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected HOST:PORT (IPv6 addresses in brackets)")
    if not host:
        raise ValueError("the host is empty")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text)


def parse_listen_address(text: str, base_dir: Path) -> ListenAddress:
    """`tcp://HOST:PORT`, `tcp://[V6]:PORT`, `unix:///abs` or `unix://relative`."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "tcp":
        try:
            host, port = _split_host_port(rest)
        except ValueError as err:
            raise ValueError(f"{text!r}: {err}") from None
        return ListenAddress("tcp", host=host, port=port)
    if sep and scheme == "unix":
        if not rest:
            raise ValueError(f"{text!r}: the socket path is empty")
        return ListenAddress("unix", path=str(base_dir / rest) if rest[0] != "/" else rest)
    raise ValueError(f"{text!r}: expected tcp://HOST:PORT or unix://PATH")


@dataclass
class _Checker:
    """Typed reads from a TOML table that record problems instead of raising."""

    where: str
    table: Mapping[str, Any]
    problems: list[str] = field(default_factory=list)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where}: key {key!r}: {message}")

    def unknown_keys(self, allowed: Sequence[str]) -> None:
        for key in self.table:
            if key not in allowed:
                choices = ", ".join(allowed)
                self.problems.append(f"{self.where}: unknown key {key!r} (allowed keys: {choices})")

    def get(self, key: str, kind: type, default: Any, *, required: bool = False) -> Any:
        if key not in self.table:
            if required:
                self.problem(key, "is required")
            return default
        value = self.table[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            self.problem(key, f"must be a {_TYPE_NAMES[kind]} (got {value!r})")
            return default
        return value

    def string(
        self, key: str, default: str = "", *, required: bool = False, max_bytes: int | None = None
    ) -> str:
        value = cast(str, self.get(key, str, default, required=required))
        if max_bytes is not None and len(value.encode()) > max_bytes:
            self.problem(key, f"is longer than {max_bytes} bytes")
        return value

    def choice(self, key: str, choices: Sequence[str], default: str | None) -> str:
        value = self.get(key, str, default, required=default is None)
        if value is None:
            self.problems[-1] += f"; choose one of {_quoted(choices)}"
            return choices[0]
        if value not in choices:
            self.problem(key, f"must be one of {_quoted(choices)} (got {value!r})")
            return choices[0]
        return cast(str, value)

    def strings(self, key: str, default: Sequence[str]) -> list[str]:
        value = self.get(key, list, list(default))
        if any(not isinstance(item, str) for item in value):
            self.problem(key, "must be a list of strings")
            return list(default)
        return cast(list[str], value)


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "list", dict: "table"}


def _quoted(choices: Sequence[str]) -> str:
    return ", ".join(f'"{choice}"' for choice in choices)


def _parse_server(
    table: Mapping[str, Any], source: str, base_dir: Path, problems: list[str]
) -> ServerConfig:
    check = _Checker(f"{source}: [server]", table, problems)
    check.unknown_keys(SERVER_KEYS)
    listen: list[ListenAddress] = []
    for text in check.strings("listen", [DEFAULT_LISTEN]):
        try:
            listen.append(parse_listen_address(text, base_dir))
        except ValueError as err:
            check.problem("listen", str(err))
    # An empty list is allowed: with systemd socket activation the sockets are inherited.
    metrics: tuple[str, int] | None = None
    metrics_text = check.string("metrics_listen", "")
    if metrics_text:
        try:
            metrics = parse_host_port(metrics_text)
        except ValueError as err:
            check.problem("metrics_listen", str(err))
    log_format = check.choice("log_format", LOG_FORMATS, "auto")
    log_level = check.choice("log_level", LOG_LEVELS, "info")
    request_metrics = cast(bool, check.get("request_metrics", bool, True))
    return ServerConfig(
        tuple(listen), metrics, cast(Any, log_format), cast(Any, log_level), request_metrics
    )


def _parse_export(
    index: int, table: Mapping[str, Any], source: str, base_dir: Path, problems: list[str]
) -> ExportConfig:
    name = table.get("name")
    label = f' ("{name}")' if isinstance(name, str) else ""
    check = _Checker(f"{source}: exports[{index}]{label}", table, problems)
    check.unknown_keys(EXPORT_KEYS)
    name = check.string("name", required=True, max_bytes=MAX_STRING_BYTES)
    path_text = check.string("path", required=True)
    if "path" in table and isinstance(table["path"], str) and not path_text:
        check.problem("path", "must not be empty")
    fmt = check.choice("format", FORMATS, None)
    guard = check.choice("header_guard", GUARD_RULE_SETS, "qemu")
    if fmt == "qcow2" and "header_guard" in table:
        check.problem("header_guard", "applies to raw exports only (qcow2 headers are pinned)")
    allowed = check.strings("allow_headers", [])
    for item in allowed:
        if item not in KNOWN_FORMATS:
            check.problem(
                "allow_headers",
                f"unknown format {item!r} (known: {', '.join(sorted(KNOWN_FORMATS))})",
            )
    return ExportConfig(
        name=name,
        path=Path(os.path.normpath(base_dir / path_text)),
        format=cast(Any, fmt),
        read_only=cast(bool, check.get("read_only", bool, False)),
        description=check.string("description", max_bytes=MAX_STRING_BYTES),
        header_guard=cast(Any, guard),
        allow_headers=frozenset(allowed),
        on_existing_header=cast(
            Any, check.choice("on_existing_header", EXISTING_HEADER_ACTIONS, "warn")
        ),
    )


def parse_config(data: Mapping[str, Any], *, source: str, base_dir: Path) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    top = _Checker(source, data, problems)
    top.unknown_keys(TOP_KEYS)
    server_table = top.get("server", dict, {})
    server = _parse_server(server_table, source, base_dir, problems)
    export_tables = top.get("exports", list, [])
    exports = _parse_exports(export_tables, source, base_dir, problems)
    if problems:
        raise ConfigError(problems)
    return Config(server, tuple(exports), None)


def _parse_exports(
    tables: list[Any], source: str, base_dir: Path, problems: list[str]
) -> list[ExportConfig]:
    if not tables:
        problems.append(f"{source}: no [[exports]]: configure at least one export")
    exports: list[ExportConfig] = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            problems.append(f"{source}: exports[{index}]: must be a table ([[exports]])")
            continue
        export = _parse_export(index, table, source, base_dir, problems)
        if export.name in seen:
            problems.append(f'{source}: exports[{index}]: duplicate export name "{export.name}"')
        seen.add(export.name)
        exports.append(export)
    return exports


def load_config(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise ConfigError([f"{path}: cannot read config: {err.strerror or err}"]) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{path}: invalid TOML: {err}"]) from err
    base_dir = Path(os.path.abspath(path)).parent
    config = parse_config(data, source=str(path), base_dir=base_dir)
    return replace(config, source=Path(os.path.abspath(path)))


def with_overrides(
    config: Config, *, listen: Sequence[str] | None = None, metrics_listen: str | None = None
) -> Config:
    """Apply command-line overrides (relative unix paths resolve against the CWD)."""
    server = config.server
    try:
        if listen:
            cwd = Path.cwd()
            server = replace(server, listen=tuple(parse_listen_address(t, cwd) for t in listen))
        if metrics_listen:
            server = replace(server, metrics_listen=parse_host_port(metrics_listen))
    except ValueError as err:
        option = "--listen" if listen else "--metrics-listen"
        raise ConfigError([f"{option}: {err}"]) from err
    return replace(config, server=server)
