"""The config file: TOML turned into frozen dataclasses, validated whole and once.

Every problem in a file is collected and reported together, each naming the file, the export
and the key, so an operator fixes a config in one pass instead of one error per restart.
Formats are never guessed: `format` is required and there is no "auto".
"""

from __future__ import annotations

import ipaddress
import json
import re
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TypeVar

from nbdguard.guard.signatures import KNOWN_FORMATS

Format = Literal["raw", "qcow2"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LogFormat = Literal["json", "console", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]
HeaderGuard = Literal["qemu", "strict", "off"]
ExistingHeaderAction = Literal["warn", "refuse"]
CheckOnOpen = Literal["light", "full"]

FORMATS: tuple[Format, ...] = ("raw", "qcow2")
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console", "auto")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
GUARD_RULE_SETS: tuple[HeaderGuard, ...] = ("qemu", "strict", "off")
EXISTING_HEADER_ACTIONS: tuple[ExistingHeaderAction, ...] = ("warn", "refuse")
CHECKS_ON_OPEN: tuple[CheckOnOpen, ...] = ("light", "full")
DEFAULT_LISTEN = "tcp://127.0.0.1:10809"
MAX_STRING_BYTES = 4096  # NBD's limit for export names and descriptions

TOP_KEYS = ("server", "exports")
SERVER_KEYS = (
    "listen", "metrics_listen", "log_format", "log_level", "request_metrics",
    "handshake_timeout", "max_connections", "max_requests_in_flight", "tls", "idle_timeout",
    "max_options", "max_option_length", "send_buffer", "max_buffered_bytes_per_connection",
    "memory_budget", "max_connections_per_client", "evict_idle_after", "socket_mode",
)  # fmt: skip
TLS_KEYS = ("mode", "cert", "key", "ca")
TlsMode = Literal["off", "on", "require"]
TLS_MODES: tuple[TlsMode, ...] = ("off", "on", "require")
GUARD_KEYS = ("header_guard", "allow_headers", "on_existing_header")
CHAIN_KEYS = ("allow_dirs", "max_chain_depth", "backing")
QCOW2_KEYS = (*CHAIN_KEYS, "check_on_open", "metadata_cache")
ACCESS_KEYS = ("allow_clients", "allow_addresses", "max_connections")
EXPORT_KEYS = (
    "name", "path", "format", "read_only", "description", *GUARD_KEYS, *QCOW2_KEYS, *ACCESS_KEYS
)  # fmt: skip
DEFAULT_MAX_CHAIN_DEPTH = 16
DEFAULT_METADATA_CACHE = 32 << 20

_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_LABEL_CHARS = 40  # how much of an export name to repeat in every message about it

_S = TypeVar("_S", bound=str)
_T = TypeVar("_T")


class ConfigError(Exception):
    """One or more problems in a config; `problems` lists each with its location."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class ListenAddress:
    scheme: Literal["tcp", "unix"]
    host: str = ""  # tcp: IP address (IPv6 without brackets) or host name
    port: int = 0  # tcp: 0 asks for an ephemeral port
    path: str = ""  # unix: absolute

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """STARTTLS: "on" offers it, "require" refuses everything else until it is done. With a
    CA, clients must present a certificate it signed."""

    mode: TlsMode = "off"
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[ListenAddress, ...]  # empty with systemd socket activation
    metrics_listen: tuple[str, int] | None = None
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"
    request_metrics: bool = True  # per-request counters and latency histograms
    handshake_timeout: float = 10.0  # seconds from accept to an export chosen (CVE-2024-7409)
    max_connections: int = 100  # open client connections, all exports together
    max_requests_in_flight: int = 256  # per connection; beyond it the server stops reading
    tls: TlsConfig = TlsConfig()
    idle_timeout: float = 0.0  # seconds without requests before a connection is closed; 0: never
    max_options: int = 64  # option requests per handshake
    max_option_length: int = 16 * 1024  # bytes of one option request's payload
    send_buffer: int = 4 << 20  # SO_SNDBUF per connection (capped by wmem_max); 0: kernel's
    # Bytes held for one connection (payloads received and not yet written, reply data read
    # and not yet sent) and for all of them together; at the limit reading stops.
    max_buffered_bytes_per_connection: int = 64 << 20
    memory_budget: int = 1 << 30
    # Connections one client (TCP source address, Unix peer uid, certificate subject) may hold.
    max_connections_per_client: int = 16
    # At max_connections, a connection idle this many seconds may be closed to admit a new
    # one; 0: never.
    evict_idle_after: float = 60.0
    socket_mode: int = 0o660  # permissions of the Unix sockets the server binds


@dataclass(frozen=True, slots=True)
class BackingPin:
    """One layer below the top image, decided by the operator: where and in what format."""

    path: Path  # absolute
    format: Format


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    path: Path  # absolute
    format: Format
    read_only: bool = False
    description: str = ""
    header_guard: HeaderGuard = "qemu"
    allow_headers: frozenset[str] = frozenset()
    # Sector 0 already an image header at open: a qcow2 declared raw would hand the guest the
    # container's bytes, so serving it takes an explicit "warn".
    on_existing_header: ExistingHeaderAction = "refuse"
    allow_dirs: tuple[Path, ...] = ()  # absolute; where backing and data files may live
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH  # images in the chain, the top included
    backing: tuple[BackingPin, ...] | None = None  # the whole chain below the top, pinned
    check_on_open: CheckOnOpen = "light"  # qcow2: "full" checks every reference like qemu-img
    metadata_cache: int = DEFAULT_METADATA_CACHE  # qcow2: bytes of L2/refcount tables cached
    # Who may see and use the export (empty: anyone who can connect). Certificate subjects
    # like "CN=web01" need a verified client certificate; networks apply to TCP clients.
    allow_clients: tuple[str, ...] = ()
    allow_addresses: tuple[IPNetwork, ...] = ()
    max_connections: int | None = None  # this export's share of [server] max_connections


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    exports: tuple[ExportConfig, ...]
    source: Path | None = None  # the file it came from; None when built in code

    def export(self, name: str) -> ExportConfig | None:
        return next((export for export in self.exports if export.name == name), None)


# Addresses


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` into (host, port); IPv6 needs brackets to be unambiguous."""
    try:
        return _split_host_port(text)
    except ValueError as err:
        raise ValueError(f"{_shown(text)}: {err}") from None


def parse_listen_address(text: str, base_dir: Path) -> ListenAddress:
    """`tcp://HOST:PORT`, `tcp://[V6]:PORT`, `unix:///abs` or `unix://relative` (to base_dir)."""
    scheme, sep, rest = text.partition("://")
    try:
        if sep and scheme == "tcp":
            host, port = _split_host_port(rest)
            return ListenAddress("tcp", host=host, port=port)
        if sep and scheme == "unix":
            _check_path(rest, "the socket path")
            return ListenAddress("unix", path=str(_absolute(base_dir, rest)))
        raise ValueError("expected tcp://HOST:PORT, tcp://[IPV6]:PORT or unix://PATH")
    except ValueError as err:
        raise ValueError(f"{_shown(text)}: {err}") from None


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_shown(host)} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected HOST:PORT (IPv6 addresses in brackets)")
        _check_host(host)
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text)


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("the host is empty")
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    # A name whose last label is numeric is a mistyped IPv4 address, not a host name.
    if not _HOSTNAME.fullmatch(host) or host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"{_shown(host)} is neither an IPv4 address nor a host name")


def _check_path(text: str, what: str) -> None:
    if not text:
        raise ValueError(f"{what} is empty")
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL character")


def _absolute(base_dir: Path, text: str) -> Path:
    """Anchor a relative path; ".." is kept, since collapsing it is wrong across symlinks."""
    return Path.cwd() / base_dir / text


# Typed reads that record problems


def _shown(value: object) -> str:
    """A value as the operator wrote it in TOML, for "(got ...)" in messages."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "a table"
    return str(value)


def _quoted(choices: Sequence[str]) -> str:
    return ", ".join(_shown(choice) for choice in choices)


_TYPE_NAMES: dict[type, str] = {str: "a string", bool: "a boolean", int: "an integer"}


@dataclass(frozen=True, slots=True)
class _Table:
    """One TOML table being read. Each read records a problem instead of raising and falls
    back to a default, so one pass over the file finds everything that is wrong with it."""

    where: str  # "config.toml: exports[1] ("vm1")"
    data: Mapping[str, object]
    problems: list[str]

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f'{self.where}: key "{key}": {message}')

    def unknown_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                self.problems.append(
                    f"{self.where}: unknown key {_shown(key)} (allowed keys: {_quoted(allowed)})"
                )

    def _typed(self, key: str, kind: type[_T], default: _T) -> _T:
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is a subclass of int: `true` must not pass for an integer, nor 1 for a boolean.
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        self.problem(key, f"must be {_TYPE_NAMES[kind]} (got {_shown(value)})")
        return default

    def required(self, key: str, hint: str = "") -> bool:
        if key in self.data:
            return True
        self.problem(key, f"is required{hint}")
        return False

    def boolean(self, key: str, default: bool) -> bool:
        return self._typed(key, bool, default)

    def number(self, key: str, default: float, *, minimum: float, integer: bool = False) -> float:
        """An int (or, unless `integer`, a float) no smaller than `minimum`."""
        value = self.data.get(key, default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "an integer" if integer else "a number"
            self.problem(key, f"must be {kind} (got {_shown(value)})")
            return default
        if value < minimum:
            self.problem(key, f"must be at least {minimum:g} (got {_shown(value)})")
            return default
        return value

    def string(self, key: str, default: str = "", *, max_bytes: int | None = None) -> str:
        value = self._typed(key, str, default)
        if max_bytes is not None and len(value.encode("utf-8", "surrogatepass")) > max_bytes:
            self.problem(key, f"must be at most {max_bytes} bytes of UTF-8")
        return value

    def choice(self, key: str, choices: Sequence[_S], default: _S) -> _S:
        value = self.data.get(key, default)
        picked = next((choice for choice in choices if choice == value), None)
        if picked is None:
            self.problem(key, f"must be one of {_quoted(choices)} (got {_shown(value)})")
            return default
        return picked

    def strings(self, key: str) -> tuple[str, ...] | None:
        """A list of strings, or None when absent or wrong."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.problem(key, f"must be a list of strings (got {_shown(value)})")
            return None
        return tuple(value)

    def table(self, key: str, where: str) -> _Table:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            self.problem(key, f"must be a table (got {_shown(value)})")
            value = {}
        return _Table(where, value, self.problems)


# The file


def _parse_server(table: _Table, base_dir: Path) -> ServerConfig:
    table.unknown_keys(SERVER_KEYS)
    return ServerConfig(
        listen=_listen_addresses(table, base_dir),
        metrics_listen=_metrics_listen(table),
        log_format=table.choice("log_format", LOG_FORMATS, "auto"),
        log_level=table.choice("log_level", LOG_LEVELS, "info"),
        request_metrics=table.boolean("request_metrics", True),
        handshake_timeout=table.number("handshake_timeout", 10.0, minimum=0.001),
        max_connections=int(table.number("max_connections", 100, minimum=1, integer=True)),
        max_requests_in_flight=int(
            table.number("max_requests_in_flight", 256, minimum=1, integer=True)
        ),
        idle_timeout=table.number("idle_timeout", 0.0, minimum=0),
        max_options=int(table.number("max_options", 64, minimum=1, integer=True)),
        max_option_length=int(
            table.number("max_option_length", 16 * 1024, minimum=4096 + 8, integer=True)
        ),
        send_buffer=int(table.number("send_buffer", 4 << 20, minimum=0, integer=True)),
        max_buffered_bytes_per_connection=int(
            table.number(
                "max_buffered_bytes_per_connection", 64 << 20, minimum=1 << 20, integer=True
            )
        ),
        memory_budget=int(table.number("memory_budget", 1 << 30, minimum=1 << 20, integer=True)),
        max_connections_per_client=int(
            table.number("max_connections_per_client", 16, minimum=1, integer=True)
        ),
        evict_idle_after=table.number("evict_idle_after", 60.0, minimum=0),
        socket_mode=_socket_mode(table),
        tls=_parse_tls(
            table.table("tls", table.where.replace("[server]", "[server.tls]")), base_dir
        ),
    )


def _socket_mode(table: _Table) -> int:
    """Unix socket permissions: an octal string ("0660") or a TOML integer (0o660)."""
    value = table.data.get("socket_mode", 0o660)
    mode: int | None = None
    if isinstance(value, str) and value and all(c in "01234567" for c in value):
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    if mode is None or not 0 <= mode <= 0o777:
        table.problem(
            "socket_mode", f'must be permissions like "0660" or 0o660 (got {_shown(value)})'
        )
        return 0o660
    return mode


def _parse_tls(table: _Table, base_dir: Path) -> TlsConfig:
    table.unknown_keys(TLS_KEYS)
    mode = table.choice("mode", TLS_MODES, "off")
    paths: dict[str, Path | None] = {}
    for key in ("cert", "key", "ca"):
        text = table.string(key)
        paths[key] = _config_path(table, key, text, base_dir) if text else None
    if mode != "off":
        for key in ("cert", "key"):
            if paths[key] is None:
                table.problem(key, f'is required when mode = "{mode}"')
    return TlsConfig(mode, paths["cert"], paths["key"], paths["ca"])


def _listen_addresses(table: _Table, base_dir: Path) -> tuple[ListenAddress, ...]:
    texts = table.strings("listen")
    if texts is None:
        texts = (DEFAULT_LISTEN,)
    addresses: list[ListenAddress] = []
    for text in texts:
        try:
            address = parse_listen_address(text, base_dir)
        except ValueError as err:
            table.problem("listen", str(err))
            continue
        if address in addresses:
            table.problem("listen", f"{address} is listed twice")
        else:
            addresses.append(address)
    return tuple(addresses)


def _metrics_listen(table: _Table) -> tuple[str, int] | None:
    if "metrics_listen" not in table.data:
        return None
    try:
        return parse_host_port(table.string("metrics_listen"))
    except ValueError as err:
        if isinstance(table.data["metrics_listen"], str):  # else string() already said why
            table.problem("metrics_listen", f"{err} (omit the key for no metrics endpoint)")
        return None


def _export_label(data: Mapping[str, object]) -> str:
    name = data.get("name")
    return _name_label(name) if isinstance(name, str) else ""


def _name_label(name: str) -> str:
    short = name if len(name) <= _LABEL_CHARS else name[:_LABEL_CHARS] + "..."
    return f" ({_shown(short)})"


def _parse_export(table: _Table, base_dir: Path) -> ExportConfig:
    table.unknown_keys(EXPORT_KEYS)
    table.required("name")
    table.required("path")
    fmt: Format = "raw"
    if table.required("format", f": one of {_quoted(FORMATS)}"):
        fmt = table.choice("format", FORMATS, "raw")
    # The guard keys apply to a qcow2 export too: to its external data file, if it has one.
    if fmt == "raw":
        for key in QCOW2_KEYS:
            if key in table.data:
                table.problem(key, "applies to qcow2 exports only (a raw image has no metadata)")
    return ExportConfig(
        name=table.string("name", max_bytes=MAX_STRING_BYTES),
        path=_export_path(table, base_dir),
        format=fmt,
        read_only=table.boolean("read_only", False),
        description=table.string("description", max_bytes=MAX_STRING_BYTES),
        header_guard=table.choice("header_guard", GUARD_RULE_SETS, "qemu"),
        allow_headers=_allow_headers(table),
        on_existing_header=table.choice("on_existing_header", EXISTING_HEADER_ACTIONS, "refuse"),
        allow_dirs=tuple(
            _config_path(table, "allow_dirs", text, base_dir)
            for text in table.strings("allow_dirs") or ()
        ),
        max_chain_depth=int(
            table.number("max_chain_depth", DEFAULT_MAX_CHAIN_DEPTH, minimum=1, integer=True)
        ),
        backing=_backing_pins(table, base_dir),
        check_on_open=table.choice("check_on_open", CHECKS_ON_OPEN, "light"),
        metadata_cache=int(
            table.number("metadata_cache", DEFAULT_METADATA_CACHE, minimum=1 << 20, integer=True)
        ),
        allow_clients=_client_subjects(table),
        allow_addresses=_networks(table),
        max_connections=(
            int(table.number("max_connections", 1, minimum=1, integer=True))
            if "max_connections" in table.data
            else None
        ),
    )


def _client_subjects(table: _Table) -> tuple[str, ...]:
    subjects = table.strings("allow_clients") or ()
    for subject in subjects:
        try:
            parse_subject(subject)
        except ValueError as err:
            table.problem("allow_clients", str(err))
    return subjects


def parse_subject(text: str) -> dict[str, str]:
    """ "CN=web01,O=Example" into {"CN": "web01", "O": "Example"}."""
    parts: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{_shown(text)}: expected ATTR=VALUE[,ATTR=VALUE...], e.g. CN=web01")
        parts[key.strip()] = value.strip()
    return parts


def _networks(table: _Table) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for text in table.strings("allow_addresses") or ():
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as err:
            table.problem("allow_addresses", f"{_shown(text)}: {err}")
    return tuple(networks)


def _config_path(table: _Table, key: str, text: str, base_dir: Path) -> Path:
    try:
        _check_path(text, "the path")
    except ValueError as err:
        table.problem(key, str(err))
    return _absolute(base_dir, text)


def _backing_pins(table: _Table, base_dir: Path) -> tuple[BackingPin, ...] | None:
    """`backing = [{path = "...", format = "raw"}, ...]`: the chain below the top, top-down."""
    if "backing" not in table.data:
        return None
    value = table.data["backing"]
    hint = 'must be a list of tables like { path = "base.qcow2", format = "qcow2" }'
    if not isinstance(value, list):
        table.problem("backing", f"{hint} (got {_shown(value)})")
        return None
    pins: list[BackingPin] = []
    for index, item in enumerate(value):
        key = f"backing[{index}]"
        if not isinstance(item, Mapping):
            table.problem(key, f"{hint} (got {_shown(item)})")
            continue
        entry = _Table(f"{table.where}: {key}", item, table.problems)
        entry.unknown_keys(("path", "format"))
        entry.required("path")
        fmt: Format = "raw"
        if entry.required("format", f": one of {_quoted(FORMATS)}"):
            fmt = entry.choice("format", FORMATS, "raw")
        pins.append(BackingPin(_export_path(entry, base_dir), fmt))
    return tuple(pins)


def _export_path(table: _Table, base_dir: Path) -> Path:
    text = table.string("path")
    if "path" in table.data and isinstance(table.data["path"], str):
        try:
            _check_path(text, "the path")
        except ValueError as err:
            table.problem("path", str(err))
    return _absolute(base_dir, text)


def _allow_headers(table: _Table) -> frozenset[str]:
    names = table.strings("allow_headers") or ()
    for name in names:
        if name not in KNOWN_FORMATS:
            known = _quoted(sorted(KNOWN_FORMATS))
            table.problem("allow_headers", f"unknown format {_shown(name)} (known: {known})")
    return frozenset(names)


def _parse_exports(top: _Table, source: str, base_dir: Path) -> tuple[ExportConfig, ...]:
    value = top.data.get("exports", [])
    if not isinstance(value, list):
        top.problem("exports", f"must be an array of tables ([[exports]]) (got {_shown(value)})")
        return ()
    if not value:
        top.problems.append(f"{source}: no [[exports]]: configure at least one export")
    exports: list[ExportConfig] = []
    first_index: dict[str, int] = {}
    for index, data in enumerate(value):
        where = f"{source}: exports[{index}]"
        if not isinstance(data, Mapping):
            top.problems.append(f"{where}: must be a table ([[exports]]) (got {_shown(data)})")
            continue
        table = _Table(where + _export_label(data), data, top.problems)
        exports.append(_parse_export(table, base_dir))
        name = data.get("name")
        if isinstance(name, str):
            if name in first_index:
                table.problem("name", f"duplicate export name (also exports[{first_index[name]}])")
            first_index.setdefault(name, index)
    return tuple(exports)


def parse_config(data: Mapping[str, object], *, source: str, base_dir: Path) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    top = _Table(source, data, problems)
    top.unknown_keys(TOP_KEYS)
    server = _parse_server(top.table("server", f"{source}: [server]"), base_dir)
    exports = _parse_exports(top, source, base_dir)
    for index, export in enumerate(exports):
        if export.allow_clients and server.tls.ca is None:
            problems.append(
                f"{source}: exports[{index}]: allow_clients needs [server.tls] with a ca, so "
                "client certificates are verified"
            )
    if problems:
        raise ConfigError(problems)
    return Config(server, exports)


def load_config(path: Path) -> Config:
    """Read and validate a config file; relative paths in it are relative to its directory."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    absolute = Path.cwd() / path
    config = parse_config(data, source=str(path), base_dir=absolute.parent)
    shared = shared_files(config.exports, str(path))
    if shared:
        raise ConfigError(shared)
    return replace(config, source=absolute)


def _file_identity(path: Path) -> tuple[str, int, int] | tuple[str, str]:
    """What makes two paths one disk: (st_dev, st_ino), or the device number of a block
    device (two nodes of one disk); the path itself when it cannot be stat'ed (opening it
    will say why)."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return ("path", str(path))
    if stat.S_ISBLK(info.st_mode):
        return ("block", info.st_rdev, 0)
    return ("file", info.st_dev, info.st_ino)


def shared_files(exports: Sequence[ExportConfig], source: str) -> list[str]:
    """Exports whose images are one file (through symlinks and hard links too): the second
    would otherwise be refused at open as if another process held the first one's lock."""
    problems: list[str] = []
    first: dict[tuple[str, int, int] | tuple[str, str], int] = {}
    for index, export in enumerate(exports):
        identity = _file_identity(export.path)
        if identity in first:
            other = first[identity]
            problems.append(
                f'{source}: exports[{index}]{_name_label(export.name)}: key "path": '
                f"{str(export.path)!r} is the same file as exports[{other}]"
                f"{_name_label(exports[other].name)} {str(exports[other].path)!r}: "
                "serve one file from one export"
            )
        else:
            first[identity] = index
    return problems


def with_overrides(
    config: Config, *, listen: Sequence[str] | None = None, metrics_listen: str | None = None
) -> Config:
    """Apply command-line overrides; relative unix paths resolve against the CWD."""
    problems: list[str] = []
    server = config.server
    if listen:
        addresses = []
        for text in listen:
            try:
                addresses.append(parse_listen_address(text, Path.cwd()))
            except ValueError as err:
                problems.append(f"--listen: {err}")
        server = replace(server, listen=tuple(addresses))
    if metrics_listen is not None:
        try:
            server = replace(server, metrics_listen=parse_host_port(metrics_listen))
        except ValueError as err:
            problems.append(f"--metrics-listen: {err}")
    if problems:
        raise ConfigError(problems)
    return replace(config, server=server)
