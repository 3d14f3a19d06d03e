"""Config loading: the contract shape, defaults, and every problem reported at once."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from nbdguard.config import (
    EXPORT_KEYS,
    SERVER_KEYS,
    TLS_KEYS,
    TOP_KEYS,
    BackingPin,
    Config,
    ConfigError,
    ExportConfig,
    ListenAddress,
    ServerConfig,
    _Table,  # the typed reads, for a rule no key exercises yet
    load_config,
    parse_config,
    parse_host_port,
    parse_listen_address,
    with_overrides,
)
from nbdguard.guard.signatures import KNOWN_FORMATS

CONTRACT = """
[server]
listen = ["unix:///run/nbdguard/nbd.sock", "tcp://127.0.0.1:10809"]
metrics_listen = "127.0.0.1:9109"
log_format = "json"
log_level = "info"

[[exports]]
name = "vm1"
path = "images/vm1.raw"
format = "raw"
read_only = false
description = "web server root disk"
header_guard = "qemu"
allow_headers = ["luks"]
on_existing_header = "warn"
"""

EXPORT = '[[exports]]\nname = "a"\npath = "a.raw"\nformat = "raw"\n'
SERVER_ALLOWED = (
    "listen", "metrics_listen", "log_format", "log_level", "request_metrics",
    "handshake_timeout", "max_connections", "max_requests_in_flight", "tls", "idle_timeout",
    "max_options", "max_option_length", "send_buffer", "max_buffered_bytes_per_connection",
    "memory_budget", "max_connections_per_client", "evict_idle_after", "socket_mode",
)  # fmt: skip
EXPORT_ALLOWED = (
    "name",
    "path",
    "format",
    "read_only",
    "description",
    "header_guard",
    "allow_headers",
    "on_existing_header",
    "allow_dirs",
    "max_chain_depth",
    "backing",
    "check_on_open",
    "metadata_cache",
    "allow_clients",
    "allow_addresses",
    "max_connections",
)


def write(directory: Path, text: str, name: str = "nbdguard.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def one_problem(tmp_path: Path, text: str) -> str:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    return problems[0]


# The contract


def test_contract_example_parses_to_the_expected_dataclasses(tmp_path: Path) -> None:
    config_path = write(tmp_path / "etc", CONTRACT)
    config = load_config(config_path)
    assert config == Config(
        server=ServerConfig(
            listen=(
                ListenAddress("unix", path="/run/nbdguard/nbd.sock"),
                ListenAddress("tcp", host="127.0.0.1", port=10809),
            ),
            metrics_listen=("127.0.0.1", 9109),
            log_format="json",
            log_level="info",
        ),
        exports=(
            ExportConfig(
                name="vm1",
                path=tmp_path / "etc" / "images" / "vm1.raw",
                format="raw",
                read_only=False,
                description="web server root disk",
                header_guard="qemu",
                allow_headers=frozenset({"luks"}),
                on_existing_header="warn",
            ),
        ),
        source=config_path,
    )
    assert config.export("vm1") is config.exports[0]
    assert config.export("nope") is None


def test_relative_paths_are_relative_to_the_config_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        '[server]\nlisten = ["unix://run/nbd.sock"]\n'
        '[[exports]]\nname = ""\npath = "../images/d.raw"\nformat = "raw"\n'
        '[[exports]]\nname = "abs"\npath = "/dev/vdb"\nformat = "raw"\n'
    )
    write(tmp_path / "etc", text)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/nbdguard.toml"))  # a relative config path, too
    assert config.source == tmp_path / "etc" / "nbdguard.toml"
    assert config.server.listen == (ListenAddress("unix", path=f"{tmp_path}/etc/run/nbd.sock"),)
    assert config.exports[0].path == tmp_path / "etc" / ".." / "images" / "d.raw"
    assert config.exports[0].path.is_absolute()
    assert config.exports[1].path == Path("/dev/vdb")


def test_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[[exports]]\nname = ""\npath = "d.raw"\nformat = "raw"\n')
    )
    assert config.server == ServerConfig(
        listen=(ListenAddress("tcp", host="127.0.0.1", port=10809),),
        metrics_listen=None,
        log_format="auto",
        log_level="info",
        request_metrics=True,
    )
    assert config.exports == (
        ExportConfig(
            name="",
            path=tmp_path / "d.raw",
            format="raw",
            read_only=False,
            description="",
            header_guard="qemu",
            allow_headers=frozenset(),
            on_existing_header="refuse",  # a header already there takes an explicit "warn"
        ),
    )
    assert config.export("") is config.exports[0]


def test_every_accepted_value(tmp_path: Path) -> None:
    text = (
        '[server]\nlisten = []\nlog_format = "console"\nlog_level = "debug"\n'
        "request_metrics = false\n"
        '[[exports]]\nname = "s"\npath = "s.raw"\nformat = "raw"\nread_only = true\n'
        'header_guard = "strict"\nallow_headers = ["luks", "vmdk", "luks"]\n'
        'on_existing_header = "refuse"\n'
        '[[exports]]\nname = "o"\npath = "o.raw"\nformat = "raw"\nheader_guard = "off"\n'
        '[[exports]]\nname = "q"\npath = "q.qcow2"\nformat = "qcow2"\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.server.listen == ()  # socket activation brings the sockets
    assert (config.server.log_format, config.server.log_level) == ("console", "debug")
    assert config.server.request_metrics is False
    strict, off, qcow2 = config.exports
    assert strict.read_only is True and strict.header_guard == "strict"
    assert strict.allow_headers == frozenset({"luks", "vmdk"})
    assert strict.on_existing_header == "refuse"
    assert off.header_guard == "off"
    assert qcow2.format == "qcow2"


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXPORT))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.exports[0].read_only = True  # type: ignore[misc]


# Problems: each names the file, the export and the key


def test_message_names_file_export_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path, EXPORT + '[[exports]]\nname = "vm1"\npath = "v"\nformat = "auto"\n', "config.toml"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(Path("config.toml"))
    assert caught.value.problems == (
        'config.toml: exports[1] ("vm1"): key "format": must be one of "raw", "qcow2" (got "auto")',
    )
    assert str(caught.value) == caught.value.problems[0]


@pytest.mark.parametrize(
    "format_line", ["", 'format = "auto"', 'format = "vmdk"', 'format = "RAW"', "format = 1"]
)
def test_format_is_required_and_the_choices_are_named(tmp_path: Path, format_line: str) -> None:
    problem = one_problem(tmp_path, f'[[exports]]\nname = "vm1"\npath = "a"\n{format_line}\n')
    assert problem.startswith(f'{tmp_path / "nbdguard.toml"}: exports[0] ("vm1"): key "format": ')
    assert '"raw", "qcow2"' in problem


def test_missing_format_says_required(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, '[[exports]]\nname = "vm1"\npath = "a"\n')
    assert problem.endswith('key "format": is required: one of "raw", "qcow2"')


@pytest.mark.parametrize(
    ("text", "where", "key", "allowed"),
    [
        ("bogus = 1\n" + EXPORT, "nbdguard.toml: ", "bogus", ("server", "exports")),
        ("[server]\nlisten_on = []\n" + EXPORT, "[server]: ", "listen_on", SERVER_ALLOWED),
        (EXPORT + "readonly = true\n", 'exports[0] ("a"): ', "readonly", EXPORT_ALLOWED),
    ],
)
def test_unknown_keys_are_errors_listing_allowed_keys(
    tmp_path: Path, text: str, where: str, key: str, allowed: tuple[str, ...]
) -> None:
    problem = one_problem(tmp_path, text)
    assert f'{where}unknown key "{key}" (allowed keys: ' in problem
    listed = problem.split("(allowed keys: ", 1)[1].rstrip(")")
    assert listed == ", ".join(f'"{name}"' for name in allowed)


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('read_only = "yes"', "read_only", 'must be a boolean (got "yes")'),
        ("read_only = 1", "read_only", "must be a boolean (got 1)"),
        ("description = 5", "description", "must be a string (got 5)"),
        ("description = true", "description", "must be a string (got true)"),
        ('allow_headers = "luks"', "allow_headers", 'must be a list of strings (got "luks")'),
        ("allow_headers = [1]", "allow_headers", "must be a list of strings (got [1])"),
        ('header_guard = "paranoid"', "header_guard", 'must be one of "qemu", "strict", "off"'),
        ("header_guard = false", "header_guard", "(got false)"),
        ('on_existing_header = "ignore"', "on_existing_header", 'one of "warn", "refuse"'),
        ('allow_headers = ["ext4"]', "allow_headers", 'unknown format "ext4" (known: '),
        ('allow_headers = ["luks", "LUKS"]', "allow_headers", 'unknown format "LUKS"'),
    ],
)
def test_wrong_export_values(tmp_path: Path, line: str, key: str, expected: str) -> None:
    problem = one_problem(tmp_path, f"{EXPORT}{line}\n")
    assert f'exports[0] ("a"): key "{key}": ' in problem
    assert expected in problem


def test_unknown_allow_header_lists_the_known_formats(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, f'{EXPORT}allow_headers = ["ext4"]\n')
    assert all(f'"{name}"' in problem for name in KNOWN_FORMATS)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[[exports]]\nname = 5\npath = "a"\nformat = "raw"\n', "name", "must be a string"),
        ('[[exports]]\npath = "a"\nformat = "raw"\n', "name", "is required"),
        ('[[exports]]\nname = "a"\nformat = "raw"\n', "path", "is required"),
        ('[[exports]]\nname = "a"\npath = ""\nformat = "raw"\n', "path", "the path is empty"),
        ('[[exports]]\nname = "a"\npath = "a\\u0000b"\nformat = "raw"\n', "path", "NUL"),
        ('[[exports]]\nname = "a"\npath = ["a"]\nformat = "raw"\n', "path", "must be a string"),
    ],
)
def test_name_and_path(tmp_path: Path, text: str, key: str, expected: str) -> None:
    problem = one_problem(tmp_path, text)
    assert f'key "{key}": ' in problem and expected in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('server = "x"\n' + EXPORT, 'nbdguard.toml: key "server": must be a table (got "x")'),
        ('[[server]]\nlog_level = "info"\n' + EXPORT, 'key "server": must be a table'),
        ("[server]\nrequest_metrics = 0\n" + EXPORT, 'key "request_metrics": must be a boolean'),
        ('[server]\nlog_level = "verbose"\n' + EXPORT, 'key "log_level": must be one of "debug"'),
        ('[server]\nlog_format = "text"\n' + EXPORT, '"log_format": must be one of "json", "con'),
        ('[server]\nlisten = "tcp://[::1]:1"\n' + EXPORT, '"listen": must be a list of strings'),
        ("[server]\nlisten = [1]\n" + EXPORT, 'key "listen": must be a list of strings (got [1])'),
        ("[server]\nmetrics_listen = 9109\n" + EXPORT, '"metrics_listen": must be a string'),
        ('exports = "vm1"\n', 'key "exports": must be an array of tables'),
        ("exports = [1]\n", "exports[0]: must be a table ([[exports]]) (got 1)"),
    ],
)
def test_wrong_server_and_top_level_values(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in one_problem(tmp_path, text)


def test_name_and_description_are_limited_to_4096_utf8_bytes(tmp_path: Path) -> None:
    fits = "é" * 2048  # 4096 bytes in 2048 characters
    text = f'[[exports]]\nname = "{fits}"\npath = "a"\nformat = "raw"\ndescription = "{fits}"\n'
    assert load_config(write(tmp_path, text)).exports[0].name == fits
    over = fits + "x"
    for key in ("name", "description"):
        line = f'{key} = "{over}"'
        text = f'[[exports]]\nname = "n"\n{line}\npath = "a"\nformat = "raw"\n'
        if key == "name":
            text = text.replace('name = "n"\n', "")
        problem = one_problem(tmp_path, text)
        assert f'key "{key}": must be at most 4096 bytes of UTF-8' in problem
        assert len(problem) < 300  # a long name is not repeated in full


def test_guard_keys_apply_to_a_qcow2_export_for_its_data_file(tmp_path: Path) -> None:
    text = (
        '[[exports]]\nname = "q"\npath = "q"\nformat = "qcow2"\nheader_guard = "strict"\n'
        'allow_headers = ["luks"]\non_existing_header = "warn"\n'
    )
    export = load_config(write(tmp_path, text)).exports[0]
    assert (export.header_guard, export.on_existing_header) == ("strict", "warn")
    assert export.allow_headers == frozenset({"luks"})


def test_duplicate_export_names_point_at_the_first_use(tmp_path: Path) -> None:
    text = EXPORT + '[[exports]]\nname = "b"\npath = "b"\nformat = "raw"\n' + EXPORT + EXPORT
    problems = problems_of(tmp_path, text)
    assert [problem.split(": ", 1)[1] for problem in problems] == [
        f'exports[{index}] ("a"): key "name": duplicate export name (also exports[0])'
        for index in (2, 3)
    ]


def test_a_bad_name_is_not_reported_as_a_duplicate(tmp_path: Path) -> None:
    bad_name = '[[exports]]\nname = 1\npath = "x"\nformat = "raw"\n'
    text = bad_name + bad_name + '[[exports]]\nname = ""\npath = "d"\nformat = "raw"\n'
    problems = problems_of(tmp_path, text)
    assert len(problems) == 2, problems
    assert not any("duplicate" in problem for problem in problems)


def test_a_duplicate_is_reported_even_when_the_export_has_other_problems(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, EXPORT + '[[exports]]\nname = "a"\npath = "b"\nformat = 1\n')
    assert len(problems) == 2 and "duplicate" in problems[1], problems


@pytest.mark.parametrize("text", ["", '[server]\nlog_level = "info"\n', "exports = []\n"])
def test_at_least_one_export_is_required(tmp_path: Path, text: str) -> None:
    problem = one_problem(tmp_path, text)
    assert problem == f"{tmp_path / 'nbdguard.toml'}: no [[exports]]: configure at least one export"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("tcp://127.0.0.1", "expected HOST:PORT"),
        ("tcp://127.0.0.1:", "the port must be a number from 0 to 65535"),
        ("tcp://127.0.0.1:70000", "the port must be a number from 0 to 65535"),
        ("tcp://127.0.0.1:-1", "the port must be a number"),
        ("tcp://127.0.0.1:١٢", "the port must be a number"),  # non-ASCII digits
        ("http://x:1", "expected tcp://HOST:PORT"),
        ("127.0.0.1:10809", "expected tcp://HOST:PORT"),
        ("tcp://:10809", "the host is empty"),
        ("tcp://::1:10809", "expected HOST:PORT (IPv6 addresses in brackets)"),
        ("tcp://[::1:10809", "expected [IPV6]:PORT"),
        ("tcp://[::1]10809", "expected [IPV6]:PORT"),
        ("tcp://[127.0.0.1]:1", '"127.0.0.1" is not an IPv6 address'),
        ("tcp://999.0.0.1:1", '"999.0.0.1" is neither an IPv4 address nor a host name'),
        ("tcp://bad host:1", '"bad host" is neither an IPv4 address nor a host name'),
        ("unix://", "the socket path is empty"),
    ],
)
def test_bad_listen_addresses(tmp_path: Path, address: str, reason: str) -> None:
    text = f'[server]\nlisten = ["tcp://[::1]:1", "{address}"]\n{EXPORT}'
    problem = one_problem(tmp_path, text)
    assert f'[server]: key "listen": "{address}": {reason}' in problem


def test_a_listen_address_given_twice_is_an_error(tmp_path: Path) -> None:
    text = f'[server]\nlisten = ["tcp://localhost:1", "tcp://localhost:1"]\n{EXPORT}'
    assert "tcp://localhost:1 is listed twice" in one_problem(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "path"),
    [
        ("tcp://[::1]:10809", "tcp", "::1", 10809, ""),
        ("tcp://[fe80::1%eth0]:1", "tcp", "fe80::1%eth0", 1, ""),
        ("tcp://127.0.0.1:10809", "tcp", "127.0.0.1", 10809, ""),
        ("tcp://0.0.0.0:0", "tcp", "0.0.0.0", 0, ""),
        ("tcp://localhost:65535", "tcp", "localhost", 65535, ""),
        ("tcp://nbd.example.org.:1", "tcp", "nbd.example.org.", 1, ""),
        ("unix:///run/nbd.sock", "unix", "", 0, "/run/nbd.sock"),
    ],
)
def test_listen_addresses_round_trip(
    text: str, scheme: str, host: str, port: int, path: str
) -> None:
    address = parse_listen_address(text, Path("/etc/nbdguard"))
    assert address == ListenAddress(scheme, host=host, port=port, path=path)  # type: ignore[arg-type]
    assert str(address) == text
    assert parse_listen_address(str(address), Path("/elsewhere")) == address


def test_relative_unix_listen_paths_resolve_against_base_dir() -> None:
    address = parse_listen_address("unix://run/nbd.sock", Path("/etc/nbdguard"))
    assert address.path == "/etc/nbdguard/run/nbd.sock"
    assert str(address) == "unix:///etc/nbdguard/run/nbd.sock"


def test_metrics_listen_parsing(tmp_path: Path) -> None:
    for text, expected in (
        ("127.0.0.1:9109", ("127.0.0.1", 9109)),
        ("[::1]:9109", ("::1", 9109)),
        ("localhost:0", ("localhost", 0)),
    ):
        assert parse_host_port(text) == expected
        config = load_config(write(tmp_path, f'[server]\nmetrics_listen = "{text}"\n{EXPORT}'))
        assert config.server.metrics_listen == expected


@pytest.mark.parametrize(
    "text", ["", "9109", ":9109", "::1:9109", "[::1]9109", "[::1]:", "host:port", "[zz]:1", "a:1:2"]
)
def test_bad_metrics_listen(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f'"{text}": ')):
        parse_host_port(text)
    problem = one_problem(tmp_path, f'[server]\nmetrics_listen = "{text}"\n{EXPORT}')
    assert f'[server]: key "metrics_listen": "{text}": ' in problem


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    text = (
        'surprise = true\n[server]\nlog_level = "loud"\nlisten = ["tcp://x", "unix://"]\n'
        '[[exports]]\nname = "a"\npath = "a"\n'
        '[[exports]]\nname = "b"\npath = ""\nformat = "qcow2"\nread_only = 1\nextra = 2\n'
        'header_guard = "loud"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    problems = caught.value.problems
    keys = [
        '"surprise"',
        'key "listen": "tcp://x"',
        'key "listen": "unix://"',
        'key "log_level"',
        'exports[0] ("a"): key "format": is required',
        'exports[1] ("b"): unknown key "extra"',
        'exports[1] ("b"): key "header_guard"',
        'exports[1] ("b"): key "path"',
        'exports[1] ("b"): key "read_only"',
    ]
    assert len(problems) == len(keys), problems
    for key in keys:
        assert sum(key in problem for problem in problems) == 1, (key, problems)
    assert str(caught.value) == "\n".join(problems)


def test_parse_config_uses_the_given_source_and_base_dir() -> None:
    data = {"exports": [{"name": "a", "path": "a.raw", "format": "raw"}]}
    config = parse_config(data, source="inline", base_dir=Path("/srv"))
    assert config.exports[0].path == Path("/srv/a.raw") and config.source is None
    with pytest.raises(ConfigError, match=r'^inline: exports\[0\] \("a"\): key "format"'):
        parse_config({"exports": [{"name": "a", "path": "a"}]}, source="inline", base_dir=Path("/"))


def test_a_boolean_never_passes_for_an_integer_nor_the_reverse() -> None:
    """No key in today's file is an integer; the rule is in place for the first one that is."""
    problems: list[str] = []
    table = _Table("f", {"n": True, "b": 1, "ok": 5}, problems)
    assert table._typed("n", int, 0) == 0
    assert table.boolean("b", False) is False
    assert table._typed("ok", int, 0) == 5
    assert problems == [
        'f: key "n": must be an integer (got true)',
        'f: key "b": must be a boolean (got 1)',
    ]


def test_config_error_from_a_single_message() -> None:
    error = ConfigError("--listen: bad")
    assert error.problems == ("--listen: bad",) and str(error) == "--listen: bad"


# Reading the file


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="^" + re.escape(f"{tmp_path}/missing.toml: cannot read config: ")
    ):
        load_config(tmp_path / "missing.toml")


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(f"{tmp_path}: cannot read config: ")):
        load_config(tmp_path)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, EXPORT + "[[exports]\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: invalid TOML: ") + ".*line 5"):
        load_config(path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(EXPORT.replace('"a"', '"\xe9"', 1).encode("latin-1"))
    with pytest.raises(
        ConfigError, match="^" + re.escape(f"{path}: not UTF-8 text (byte offset 20)")
    ):
        load_config(path)


# Command-line overrides


def test_overrides_replace_listen_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write(tmp_path / "etc", CONTRACT))
    monkeypatch.chdir(tmp_path)
    changed = with_overrides(
        config, listen=["tcp://[::1]:1234", "unix://nbd.sock"], metrics_listen="[::]:1"
    )
    assert changed.server.listen == (
        ListenAddress("tcp", host="::1", port=1234),
        ListenAddress("unix", path=f"{tmp_path}/nbd.sock"),  # the CWD, not the config's dir
    )
    assert changed.server.metrics_listen == ("::", 1)
    assert changed.exports == config.exports and changed.source == config.source
    assert config.server.metrics_listen == ("127.0.0.1", 9109)  # the original is untouched


def test_no_overrides_change_nothing(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONTRACT))
    assert with_overrides(config) == config
    assert with_overrides(config, listen=[]) == config
    only_metrics = with_overrides(config, metrics_listen="localhost:2")
    assert only_metrics.server.listen == config.server.listen
    assert only_metrics.server.metrics_listen == ("localhost", 2)


def test_bad_overrides_name_the_option(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONTRACT))
    with pytest.raises(ConfigError) as caught:
        with_overrides(config, listen=["nbd://x", "tcp://h:1"], metrics_listen="9109")
    assert caught.value.problems == (
        '--listen: "nbd://x": expected tcp://HOST:PORT, tcp://[IPV6]:PORT or unix://PATH',
        '--metrics-listen: "9109": expected HOST:PORT (IPv6 addresses in brackets)',
    )
    with pytest.raises(ConfigError, match=r"^--metrics-listen: "):
        with_overrides(config, listen=["tcp://h:1"], metrics_listen="")


EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "nbdguard.example.toml"
_SECTION = re.compile(r"\[\[?([\w.]+)\]\]?\s*(#.*)?")
_SETTING = re.compile(r"(\w+)\s*=\s*\S")


def _commented_setting(line: str) -> str | None:
    """`# key = value` or `# [table]`, without the comment mark; None for prose."""
    if not line.startswith("# "):
        return None
    body = line[2:]
    return body if _SECTION.fullmatch(body) or _SETTING.match(body) else None


def documented_keys(text: str) -> dict[str, set[str]]:
    """Keys per table, set or shown commented out (`# key = value`)."""
    keys: dict[str, set[str]] = {"": set()}
    section = ""
    for line in text.splitlines():
        body = _commented_setting(line) or line
        header = _SECTION.fullmatch(body)
        if header:
            section = header.group(1)
            keys.setdefault(section, set())
            keys[""].add(section.split(".")[0])
            if "." in section:
                parent, child = section.rsplit(".", 1)
                keys.setdefault(parent, set()).add(child)
            continue
        setting = _SETTING.match(body)
        if setting:
            keys[section].add(setting.group(1))
    return keys


def test_shipped_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert [export.name for export in config.exports] == ["vm1", "install-media", "vm2", "vm3"]
    assert config.exports[1].read_only
    assert config.exports[2].backing is not None and len(config.exports[2].backing) == 2
    assert config.server.metrics_listen == ("127.0.0.1", 9109)
    assert config.exports[3].format == "qcow2" and config.exports[3].header_guard == "qemu"


def test_shipped_example_documents_every_key_of_the_schema() -> None:
    documented = documented_keys(EXAMPLE.read_text())
    schema = {
        "": TOP_KEYS,
        "server": SERVER_KEYS,
        "server.tls": TLS_KEYS,
        "exports": EXPORT_KEYS,
    }
    for table, keys in schema.items():
        missing = sorted(set(keys) - documented.get(table, set()))
        assert not missing, f"config/nbdguard.example.toml lacks [{table}] keys {missing}"
    backing = tomllib.loads(EXAMPLE.read_text())["exports"][2]["backing"]
    assert {key for pin in backing for key in pin} == {"path", "format"}


def test_shipped_example_is_valid_with_its_commented_settings_too() -> None:
    """The commented-out settings are real ones: uncommented, the file still validates."""
    lines = [_commented_setting(line) or line for line in EXAMPLE.read_text().splitlines()]
    assert sum(1 for line in EXAMPLE.read_text().splitlines() if _commented_setting(line)) >= 4
    config = parse_config(
        tomllib.loads("\n".join(lines)), source="example", base_dir=EXAMPLE.parent
    )
    assert config.server.tls.ca == EXAMPLE.parent / "pki/ca-cert.pem"
    assert config.exports[0].allow_clients == ("CN=web01",)


def test_documented_keys_sees_set_commented_and_table_keys() -> None:
    text = '[server]\nlisten = []\n# idle_timeout = 0\n# see the README\n[server.tls]\n# ca = "x"\n'
    keys = documented_keys(text)
    assert keys == {
        "": {"server"},
        "server": {"listen", "idle_timeout", "tls"},
        "server.tls": {"ca"},
    }


def test_limit_keys(tmp_path: Path) -> None:
    base = '[[exports]]\nname="a"\npath="a"\nformat="raw"\n[server]\n'
    config = load_config(write(tmp_path, base + "handshake_timeout = 2.5\nmax_connections = 7\n"))
    assert config.server.handshake_timeout == 2.5 and config.server.max_connections == 7
    defaults = load_config(write(tmp_path, base))
    assert defaults.server.handshake_timeout == 10 and defaults.server.max_connections == 100
    for bad in (
        "max_connections = 0",
        "max_connections = 1.5",
        "handshake_timeout = -1",
        'handshake_timeout = "10s"',
        "max_connections = true",
    ):
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, base + bad + "\n"))
        assert bad.split(" ")[0] in str(caught.value)


QCOW2 = '[[exports]]\nname = "vm"\npath = "images/vm.qcow2"\nformat = "qcow2"\n'


def test_chain_keys_are_read_with_paths_relative_to_the_config(tmp_path: Path) -> None:
    text = QCOW2 + (
        'allow_dirs = ["base", "/srv/shared"]\nmax_chain_depth = 3\n'
        'backing = [{ path = "base/web.qcow2", format = "qcow2" },'
        ' { path = "/srv/shared/debian.raw", format = "raw" }]\n'
    )
    export = load_config(write(tmp_path, text)).exports[0]
    assert export.allow_dirs == (tmp_path / "base", Path("/srv/shared"))
    assert export.max_chain_depth == 3
    assert export.backing == (
        BackingPin(tmp_path / "base/web.qcow2", "qcow2"),
        BackingPin(Path("/srv/shared/debian.raw"), "raw"),
    )


def test_chain_defaults_pin_nothing(tmp_path: Path) -> None:
    export = load_config(write(tmp_path, QCOW2)).exports[0]
    assert (export.allow_dirs, export.max_chain_depth, export.backing) == ((), 16, None)
    pinned_empty = load_config(write(tmp_path, QCOW2 + "backing = []\n")).exports[0]
    assert pinned_empty.backing == ()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_chain_depth = 0", 'key "max_chain_depth": must be at least 1'),
        ('backing = "base.raw"', 'key "backing": must be a list of tables'),
        ('backing = [{ path = "b.raw" }]', 'backing[0]: key "format": is required'),
        ('backing = [{ path = "b.raw", format = "vmdk" }]', 'key "format": must be one of'),
        ('backing = [{ path = "b.raw", format = "raw", x = 1 }]', 'unknown key "x"'),
        ("allow_dirs = [1]", 'key "allow_dirs": must be a list of strings'),
    ],
)
def test_bad_chain_keys_are_named(tmp_path: Path, line: str, message: str) -> None:
    assert message in one_problem(tmp_path, QCOW2 + line + "\n")


def test_chain_keys_on_a_raw_export_are_refused(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, EXPORT + 'allow_dirs = ["x"]\n')
    assert 'key "allow_dirs": applies to qcow2 exports only' in problem


def test_tls_table_and_access_keys(tmp_path: Path) -> None:
    text = (
        '[server.tls]\nmode = "require"\ncert = "pki/cert.pem"\nkey = "pki/key.pem"\n'
        'ca = "pki/ca.pem"\n'
        + EXPORT
        + 'allow_clients = ["CN=web01", "O=Example,CN=db02"]\n'
        + 'allow_addresses = ["10.1.2.3/8", "::1"]\n'
    )
    config = load_config(write(tmp_path, text))
    tls = config.server.tls
    assert (tls.mode, tls.cert, tls.ca) == (
        "require",
        tmp_path / "pki/cert.pem",
        tmp_path / "pki/ca.pem",
    )
    export = config.exports[0]
    assert export.allow_clients == ("CN=web01", "O=Example,CN=db02")
    assert [str(n) for n in export.allow_addresses] == ["10.0.0.0/8", "::1/128"]
    assert load_config(write(tmp_path, EXPORT)).server.tls.mode == "off"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server.tls]\nmode = "on"\n' + EXPORT, '[server.tls]: key "cert": is required'),
        ('[server.tls]\nmode = "always"\n' + EXPORT, 'key "mode": must be one of'),
        ('[server.tls]\nciphers = "x"\n' + EXPORT, 'unknown key "ciphers"'),
        (EXPORT + 'allow_clients = ["web01"]\n', "expected ATTR=VALUE"),
        (EXPORT + 'allow_clients = ["CN=web01"]\n', "allow_clients needs [server.tls] with a ca"),
        (EXPORT + 'allow_addresses = ["10.0.0.300/8"]\n', 'key "allow_addresses": "10.0.0.300/8"'),
    ],
)
def test_bad_tls_and_access_keys_are_named(tmp_path: Path, text: str, message: str) -> None:
    assert any(message in problem for problem in problems_of(tmp_path, text))


def test_more_limit_keys(tmp_path: Path) -> None:
    text = (
        "[server]\nidle_timeout = 30\nmax_options = 8\nmax_option_length = 8192\n"
        + EXPORT
        + "max_connections = 2\n"
    )
    config = load_config(write(tmp_path, text))
    assert (config.server.idle_timeout, config.server.max_options) == (30, 8)
    assert config.server.max_option_length == 8192
    assert config.exports[0].max_connections == 2
    defaults = load_config(write(tmp_path, EXPORT))
    assert defaults.server.idle_timeout == 0 and defaults.exports[0].max_connections is None
    assert "must be at least 4104" in one_problem(
        tmp_path, "[server]\nmax_option_length = 100\n" + EXPORT
    )


def test_send_buffer(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, EXPORT)).server.send_buffer == 4 << 20
    config = load_config(write(tmp_path, "[server]\nsend_buffer = 0\n" + EXPORT))
    assert config.server.send_buffer == 0
    assert "must be an integer" in one_problem(tmp_path, '[server]\nsend_buffer = "4M"\n' + EXPORT)


def test_budget_and_admission_keys(tmp_path: Path) -> None:
    server = load_config(write(tmp_path, EXPORT)).server
    assert server.max_buffered_bytes_per_connection == 64 << 20
    assert server.memory_budget == 1 << 30
    assert (server.max_connections_per_client, server.evict_idle_after) == (16, 60.0)
    assert server.socket_mode == 0o660
    text = (
        "[server]\nmax_buffered_bytes_per_connection = 2097152\nmemory_budget = 8388608\n"
        'max_connections_per_client = 2\nevict_idle_after = 0\nsocket_mode = "0600"\n'
    )
    server = load_config(write(tmp_path, text + EXPORT)).server
    assert server.max_buffered_bytes_per_connection == 2 << 20
    assert (server.memory_budget, server.max_connections_per_client) == (8 << 20, 2)
    assert (server.evict_idle_after, server.socket_mode) == (0, 0o600)
    as_integer = load_config(write(tmp_path, "[server]\nsocket_mode = 0o640\n" + EXPORT))
    assert as_integer.server.socket_mode == 0o640


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("memory_budget = 1000", 'key "memory_budget": must be at least'),
        ("max_connections_per_client = 0", "must be at least 1"),
        ('socket_mode = "rw-rw----"', 'key "socket_mode": must be permissions like'),
        ("socket_mode = 0o7777", 'key "socket_mode": must be permissions like'),
    ],
)
def test_bad_budget_and_admission_keys(tmp_path: Path, line: str, message: str) -> None:
    assert message in one_problem(tmp_path, f"[server]\n{line}\n" + EXPORT)


def test_qcow2_check_and_cache_keys(tmp_path: Path) -> None:
    export = load_config(write(tmp_path, QCOW2)).exports[0]
    assert (export.check_on_open, export.metadata_cache) == ("light", 32 << 20)
    text = QCOW2 + 'check_on_open = "full"\nmetadata_cache = 4194304\n'
    export = load_config(write(tmp_path, text)).exports[0]
    assert (export.check_on_open, export.metadata_cache) == ("full", 4 << 20)
    assert 'must be one of "light", "full"' in one_problem(
        tmp_path, QCOW2 + 'check_on_open = "none"\n'
    )
    problem = one_problem(tmp_path, EXPORT + 'check_on_open = "full"\n')
    assert 'key "check_on_open": applies to qcow2 exports only' in problem


# One file, one export


def _two_exports(first: str, second: str) -> str:
    return (
        f'[[exports]]\nname = "a"\npath = "{first}"\nformat = "raw"\n'
        f'[[exports]]\nname = "b"\npath = "{second}"\nformat = "raw"\nread_only = true\n'
    )


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "dotdot"])
def test_two_exports_on_one_file_are_an_error_naming_both(tmp_path: Path, link: str) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(4096))
    (tmp_path / "sub").mkdir()
    second = {"same": "disk.raw", "symlink": "alias.raw", "hardlink": "hard.raw"}.get(
        link, "sub/../disk.raw"
    )
    if link == "symlink":
        (tmp_path / "alias.raw").symlink_to("disk.raw")
    if link == "hardlink":
        (tmp_path / "hard.raw").hardlink_to(tmp_path / "disk.raw")
    config = write(tmp_path, _two_exports("disk.raw", second))
    problem = one_problem(tmp_path, config.read_text())
    assert problem.startswith(f'{config}: exports[1] ("b"): key "path": ')
    assert f"is the same file as exports[0] (\"a\") '{tmp_path / 'disk.raw'}'" in problem
    assert second.rsplit("/", 1)[-1] in problem


def test_distinct_and_missing_files_are_not_shared(tmp_path: Path) -> None:
    (tmp_path / "one.raw").write_bytes(bytes(512))
    (tmp_path / "two.raw").write_bytes(bytes(512))
    assert len(load_config(write(tmp_path, _two_exports("one.raw", "two.raw"))).exports) == 2
    # Files that do not exist are compared by path (the open then says what is missing).
    assert len(load_config(write(tmp_path, _two_exports("gone.raw", "lost.raw"))).exports) == 2
    assert "same file as" in one_problem(tmp_path, _two_exports("gone.raw", "gone.raw"))
